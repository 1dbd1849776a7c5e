'use strict';
// Ember's runtime interface client for Node.js (the nodejs root
// filesystem's /usr/lib/ember/ric.js; `node ric.js FILE.FUNCTION`).
//
// It speaks Lambda's Runtime API (AWS_LAMBDA_RUNTIME_API, version
// 2018-06-01) and keeps Lambda's Node.js handler contract: the handler
// `[dir/]file.fn[.nested]` from LAMBDA_TASK_ROOT (.js, .cjs, or .mjs and
// ES modules through import()), async handlers and callback handlers,
// Lambda's `context` (and its legacy done/succeed/fail), errors as
// {errorType, errorMessage, trace}, console output prefixed with the
// request id. Node's own modules only: the image has no npm.

const http = require('http');
const fs = require('fs');
const path = require('path');
const util = require('util');
const { pathToFileURL } = require('url');

const API_VERSION = '2018-06-01';
const ERROR_TYPE_HEADER = 'Lambda-Runtime-Function-Error-Type';
// The exit status Lambda's Node.js runtime uses after an uncaught error.
const FATAL_EXIT = 129;

// --- Errors as Lambda shapes them ---------------------------------------

// An Error becomes {errorType: its name, errorMessage, trace: its stack
// lines}; anything else thrown or passed to a callback becomes
// {errorType: typeof, errorMessage: String(value), trace: []}.
function errorResponse(err) {
  const isError =
    err instanceof Error ||
    (err !== null && typeof err === 'object' && typeof err.message === 'string' && typeof err.stack === 'string');
  if (isError) {
    return {
      errorType: String(err.name || 'Error'),
      errorMessage: String(err.message),
      trace: String(err.stack || '').split('\n'),
    };
  }
  let message;
  try {
    message = typeof err === 'object' && err !== null ? JSON.stringify(err) : String(err);
  } catch (e) {
    message = util.inspect(err);
  }
  return { errorType: typeof err, errorMessage: message, trace: [] };
}

// A failure of the runtime around the user's code (loading it, an unhandled
// rejection): Lambda's `Runtime.*` type, the cause in the message.
function runtimeError(type, cause) {
  const inner = errorResponse(cause);
  const message = inner.trace.length ? `${inner.errorType}: ${inner.errorMessage}` : inner.errorMessage;
  return { errorType: type, errorMessage: message, trace: inner.trace };
}

// --- Runtime API client --------------------------------------------------

class RuntimeApi {
  constructor(endpoint) {
    const colon = endpoint ? endpoint.lastIndexOf(':') : -1;
    if (colon <= 0) throw new Error(`AWS_LAMBDA_RUNTIME_API must be HOST:PORT, not ${JSON.stringify(endpoint)}`);
    this.host = endpoint.slice(0, colon).replace(/^\[|\]$/g, '');
    this.port = Number(endpoint.slice(colon + 1));
    // One connection, kept between calls; an idle keep-alive socket does
    // not hold the event loop open (callbackWaitsForEmptyEventLoop).
    this.agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
  }

  request(method, suffix, body, headers) {
    return new Promise((resolve, reject) => {
      const data = body === undefined ? undefined : Buffer.from(body);
      const req = http.request(
        {
          host: this.host,
          port: this.port,
          method,
          path: `/${API_VERSION}/runtime/${suffix}`,
          agent: this.agent,
          headers: data ? { 'Content-Type': 'application/json', 'Content-Length': data.length, ...headers } : headers,
        },
        (res) => {
          const chunks = [];
          res.on('data', (c) => chunks.push(c));
          res.on('end', () => resolve({ status: res.statusCode, headers: res.headers, body: Buffer.concat(chunks) }));
          res.on('error', reject);
        },
      );
      req.on('error', reject);
      req.end(data);
    });
  }

  async next() {
    const res = await this.request('GET', 'invocation/next');
    if (res.status !== 200) throw new Error(`invocation/next answered ${res.status}: ${res.body}`);
    return res;
  }

  async respond(id, payload) {
    return this.request('POST', `invocation/${encodeURIComponent(id)}/response`, payload, {});
  }

  async fail(id, shaped) {
    return this.request('POST', `invocation/${encodeURIComponent(id)}/error`, JSON.stringify(shaped), {
      [ERROR_TYPE_HEADER]: headerSafe(shaped.errorType),
    });
  }

  async initError(shaped) {
    return this.request('POST', 'init/error', JSON.stringify(shaped), {
      [ERROR_TYPE_HEADER]: headerSafe(shaped.errorType),
    });
  }
}

// A header value must be printable ASCII without line breaks.
function headerSafe(s) {
  return String(s).replace(/[^\x20-\x7e]/g, '?');
}

// --- Handler loading -----------------------------------------------------

class HandlerError extends Error {
  constructor(type, message) {
    super(message);
    this.name = type;
  }
}

// `dir/file.fn.nested` -> {modulePath: 'dir/file', fnPath: ['fn', 'nested']}:
// the module ends at the first dot after the last slash.
function splitHandler(handler) {
  const slash = handler.lastIndexOf('/');
  const dot = handler.indexOf('.', slash + 1);
  if (!handler || dot <= slash + 1 || dot === handler.length - 1) {
    throw new HandlerError('Runtime.MalformedHandlerName', `Bad handler ${handler}`);
  }
  return { modulePath: handler.slice(0, dot), fnPath: handler.slice(dot + 1).split('.') };
}

function isFile(p) {
  try {
    return fs.statSync(p).isFile();
  } catch (e) {
    return false;
  }
}

async function importFile(file) {
  return import(pathToFileURL(file).href);
}

// Loads the module as Node would by its extension; a `.js` file in an ES
// module package (`"type": "module"`) is refused by require() and imported.
async function loadModule(taskRoot, modulePath) {
  const base = path.resolve(taskRoot, modulePath);
  const target = isFile(`${base}.js`) ? `${base}.js` : base;
  try {
    if (target === base && isFile(`${base}.mjs`)) return await importFile(`${base}.mjs`);
    if (target === base && isFile(`${base}.cjs`)) return require(`${base}.cjs`);
    try {
      return require(target);
    } catch (e) {
      if (e && e.code === 'ERR_REQUIRE_ESM') return await importFile(target);
      throw e;
    }
  } catch (e) {
    if (e instanceof SyntaxError) throw Object.assign(runtimeError('Runtime.UserCodeSyntaxError', e), { shaped: true });
    // The handler's own module is missing (not one that it requires).
    if (e && e.code === 'MODULE_NOT_FOUND' && String(e.message).startsWith(`Cannot find module '${target}'`)) {
      throw new HandlerError('Runtime.ImportModuleError', `Error: Cannot find module '${path.basename(modulePath)}'`);
    }
    throw Object.assign(runtimeError('Runtime.ImportModuleError', e), { shaped: true });
  }
}

async function loadHandler(taskRoot, handler) {
  const { modulePath, fnPath } = splitHandler(handler);
  let fn = await loadModule(taskRoot, modulePath);
  for (const key of fnPath) fn = fn == null ? undefined : fn[key];
  if (typeof fn !== 'function') {
    throw new HandlerError('Runtime.HandlerNotFound', `${handler} is undefined or not exported`);
  }
  return fn;
}

// --- Logging -------------------------------------------------------------

// console.* as in Lambda: `TIME\tREQUEST_ID\tLEVEL\tMESSAGE`.
let currentRequestId;
function patchConsole() {
  const levels = [
    ['log', 'INFO', process.stdout],
    ['info', 'INFO', process.stdout],
    ['debug', 'DEBUG', process.stdout],
    ['warn', 'WARN', process.stderr],
    ['error', 'ERROR', process.stderr],
    ['trace', 'TRACE', process.stderr],
  ];
  for (const [method, level, stream] of levels) {
    console[method] = (...args) => {
      let message = util.format(...args);
      if (method === 'trace') message = `Trace: ${message}\n${new Error().stack.split('\n').slice(2).join('\n')}`;
      stream.write(`${new Date().toISOString()}\t${currentRequestId}\t${level}\t${message}\n`);
    };
  }
}

// --- Invocations ---------------------------------------------------------

function parseJsonHeader(value) {
  if (value === undefined) return undefined;
  try {
    return JSON.parse(value);
  } catch (e) {
    return undefined;
  }
}

// The invocation in progress (for errors that escape the handler), and
// whether the handler is loaded (errors before that are init errors).
let current = null;
let initialized = false;

// Runs one invocation to its end: resolves once its outcome is posted.
function invoke(api, handler, res) {
  return new Promise((resolve, reject) => {
    const h = res.headers;
    const id = h['lambda-runtime-aws-request-id'];
    const deadline = Number(h['lambda-runtime-deadline-ms']);
    if (h['lambda-runtime-trace-id']) process.env._X_AMZN_TRACE_ID = h['lambda-runtime-trace-id'];
    else delete process.env._X_AMZN_TRACE_ID;
    currentRequestId = id;

    // settled: the outcome is decided (later calls are ignored); it is
    // posted at once, or when the event loop is empty for a callback with
    // callbackWaitsForEmptyEventLoop.
    let settled = false;
    let waiting = null;
    let returnedPromise = false;
    const post = (err, result) => {
      let sent;
      if (err !== undefined && err !== null) {
        sent = api.fail(id, errorResponse(err));
      } else {
        let body;
        try {
          body = JSON.stringify(result === undefined ? null : result);
        } catch (e) {
          sent = api.fail(id, runtimeError('Runtime.SerializationError', e));
        }
        if (!sent) sent = api.respond(id, body);
      }
      sent.then((r) => {
        if (r.status >= 300) process.stderr.write(`ric: posting the outcome of ${id} answered ${r.status}: ${r.body}\n`);
        current = null;
        resolve();
      }, reject);
    };
    const onIdle = () => {
      process.removeListener('beforeExit', onIdle);
      if (waiting) return post(...waiting);
      if (settled) return undefined;
      settled = true;
      // Nothing is left that could settle the handler: a callback handler
      // that never called back answers null, as Lambda's does; a promise
      // that can no longer settle is an error.
      if (returnedPromise) {
        return post(new HandlerError('Runtime.HandlerNotSettled', 'the handler\'s promise never settled; nothing was left to run'));
      }
      return post(null, null);
    };
    const settleNow = (err, result) => {
      if (settled) return;
      settled = true;
      process.removeListener('beforeExit', onIdle);
      post(err, result);
    };
    const callback = (err, result) => {
      if (settled) return;
      settled = true;
      if (context.callbackWaitsForEmptyEventLoop) waiting = [err, result];
      else {
        process.removeListener('beforeExit', onIdle);
        post(err, result);
      }
    };
    const context = {
      callbackWaitsForEmptyEventLoop: true,
      functionName: process.env.AWS_LAMBDA_FUNCTION_NAME,
      functionVersion: process.env.AWS_LAMBDA_FUNCTION_VERSION,
      invokedFunctionArn: h['lambda-runtime-invoked-function-arn'],
      memoryLimitInMB: process.env.AWS_LAMBDA_FUNCTION_MEMORY_SIZE,
      awsRequestId: id,
      logGroupName: process.env.AWS_LAMBDA_LOG_GROUP_NAME,
      logStreamName: process.env.AWS_LAMBDA_LOG_STREAM_NAME,
      identity: parseJsonHeader(h['lambda-runtime-cognito-identity']),
      clientContext: parseJsonHeader(h['lambda-runtime-client-context']),
      getRemainingTimeInMillis: () => (Number.isFinite(deadline) ? Math.max(0, deadline - Date.now()) : 0),
      done: (err, result) => settleNow(err, result),
      succeed: (result) => settleNow(null, result),
      fail: (err) => settleNow(err === undefined || err === null ? 'handled' : err),
    };
    current = { id };
    process.on('beforeExit', onIdle);

    let event;
    try {
      event = JSON.parse(res.body.toString('utf8'));
    } catch (e) {
      settleNow(runtimeError('Runtime.InvalidEventPayload', e));
      return;
    }
    let out;
    try {
      out = handler(event, context, callback);
    } catch (e) {
      settleNow(e);
      return;
    }
    if (out !== null && (typeof out === 'object' || typeof out === 'function') && typeof out.then === 'function') {
      returnedPromise = true;
      out.then(
        (result) => settleNow(null, result),
        (err) => settleNow(err === undefined || err === null ? new Error(String(err)) : err),
      );
    }
  });
}

// An error no handler caught: reported for the invocation in progress (or
// as the init error), then the runtime exits, as Lambda's does.
function installFatalHandlers(api) {
  let dying = false;
  const die = (shaped) => {
    if (dying) return;
    dying = true;
    process.stderr.write(`${new Date().toISOString()}\t${currentRequestId}\tERROR\t${shaped.errorType}: ${shaped.errorMessage}\n`);
    let sent = Promise.resolve();
    if (current) sent = api.fail(current.id, shaped);
    else if (!initialized) sent = api.initError(shaped);
    sent.catch(() => undefined).finally(() => process.exit(FATAL_EXIT));
  };
  process.on('uncaughtException', (err) => die(errorResponse(err)));
  process.on('unhandledRejection', (reason) => die(runtimeError('Runtime.UnhandledPromiseRejection', reason)));
}

async function run(handlerName) {
  const api = new RuntimeApi(process.env.AWS_LAMBDA_RUNTIME_API);
  patchConsole();
  installFatalHandlers(api);
  let handler;
  try {
    if (!handlerName) throw new HandlerError('Runtime.MalformedHandlerName', 'no handler given (argv[2] or _HANDLER)');
    handler = await loadHandler(process.env.LAMBDA_TASK_ROOT || '/var/task', handlerName);
  } catch (e) {
    const shaped = e && e.shaped ? { errorType: e.errorType, errorMessage: e.errorMessage, trace: e.trace } : errorResponse(e);
    process.stderr.write(`${new Date().toISOString()}\tundefined\tERROR\t${shaped.errorType}: ${shaped.errorMessage}\n`);
    await api.initError(shaped).catch(() => undefined);
    process.exit(FATAL_EXIT);
  }
  initialized = true;
  for (;;) {
    const res = await api.next();
    await invoke(api, handler, res);
  }
}

module.exports = { run, errorResponse, splitHandler, loadHandler };

if (require.main === module) {
  run(process.argv[2] || process.env._HANDLER).catch((e) => {
    process.stderr.write(`ric: ${e && e.stack ? e.stack : e}\n`);
    process.exit(1);
  });
}
