//! The protocol's numbers, named as the NBD protocol document names them
//! without the `NBD_` prefix (transmission flags, `NBD_FLAG_*` there, are
//! `TFLAG_*` here to keep them apart from the handshake flags).

// Magic numbers.
/// The server's greeting starts with this (ASCII `NBDMAGIC`).
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// Newstyle negotiation's magic, also the start of every option (ASCII
/// `IHAVEOPT`).
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The start of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// The start of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// The start of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// The start of one structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (the server's, 16 bits).
/// The server speaks fixed newstyle negotiation.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// The server can leave out the 124 zeroes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;

// Client flags (32 bits).
/// The client speaks fixed newstyle negotiation.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// The client wants no zeroes after `NBD_OPT_EXPORT_NAME`'s answer.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Options.
/// Opens an export and ends negotiation (no error reply exists).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Ends negotiation; answered with `NBD_REP_ACK`.
pub const OPT_ABORT: u32 = 2;
/// Lists exports (`NBD_REP_SERVER` replies, then `NBD_REP_ACK`).
pub const OPT_LIST: u32 = 3;
/// Upgrades the session to TLS.
pub const OPT_STARTTLS: u32 = 5;
/// Describes an export without opening it.
pub const OPT_INFO: u32 = 6;
/// Describes and opens an export.
pub const OPT_GO: u32 = 7;
/// Asks for structured replies in the transmission phase.
pub const OPT_STRUCTURED_REPLY: u32 = 8;

// Option reply types.
/// The option is done (or accepted).
pub const REP_ACK: u32 = 1;
/// One export of an `NBD_OPT_LIST`.
pub const REP_SERVER: u32 = 2;
/// One piece of information about an export (`NBD_INFO_*`).
pub const REP_INFO: u32 = 3;
/// Set in every error reply type.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// The option is unknown to the server.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
/// The server's policy forbids the option.
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
/// The option is malformed.
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
/// The option is not supported on the server's platform.
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
/// TLS must be started first.
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
/// No such export.
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
/// The server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
/// The client must ask for block sizes.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
/// The request is too big.
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

// Information types (`NBD_REP_INFO`).
/// The export's size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// The export's minimum, preferred and maximum block sizes.
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags (`NBD_FLAG_*`, 16 bits).
/// Always set: the other flags mean something.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// The export is read-only.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// `NBD_CMD_FLUSH` is supported.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// `NBD_CMD_FLAG_FUA` is supported.
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
/// `NBD_CMD_TRIM` is supported.
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// `NBD_CMD_WRITE_ZEROES` is supported.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;

// Commands.
/// Reads `length` bytes at `offset`.
pub const CMD_READ: u16 = 0;
/// Writes the `length` bytes that follow the request.
pub const CMD_WRITE: u16 = 1;
/// Ends the session (no reply).
pub const CMD_DISC: u16 = 2;
/// Makes every acknowledged write durable.
pub const CMD_FLUSH: u16 = 3;
/// Discards a range (a hint).
pub const CMD_TRIM: u16 = 4;
/// Writes zeroes to a range without sending them.
pub const CMD_WRITE_ZEROES: u16 = 6;

// Command flags.
/// The command's writes are durable when it is acknowledged.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// `NBD_CMD_WRITE_ZEROES` must allocate (not punch a hole).
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

// Structured replies.
/// The chunk is the reply's last.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// No payload; only as the last chunk.
pub const REPLY_TYPE_NONE: u16 = 0;
/// An offset, then data read there.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// An offset and a length that read as zeroes.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Set in every error chunk type.
pub const REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;
/// An error: errno, message length, message.
pub const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_ERROR_BIT | 1;
/// An error at an offset: errno, message length, message, offset.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_ERROR_BIT | 2;

// Error values in replies (the protocol fixes them to Linux's errno values).
/// Operation not permitted (also: a write to a read-only export).
pub const EPERM: u32 = 1;
/// Input/output error.
pub const EIO: u32 = 5;
/// Cannot allocate memory.
pub const ENOMEM: u32 = 12;
/// Invalid argument (also: an unknown command or flag).
pub const EINVAL: u32 = 22;
/// No space left (also: a write past the end).
pub const ENOSPC: u32 = 28;
/// Value too large.
pub const EOVERFLOW: u32 = 75;
/// Operation not supported.
pub const ENOTSUP: u32 = 95;
/// The server is shutting down.
pub const ESHUTDOWN: u32 = 108;

// Bounds on what a peer can make us read into memory.
/// Longest option data, option reply data or non-data chunk payload
/// accepted: more ends the connection rather than being allocated.
pub const MAX_OPTION_DATA: u32 = 64 << 10;
/// Longest request payload (a write's data, or a read's length) a server
/// accepts: 32 MiB, the bound servers commonly use.
pub const MAX_PAYLOAD: u32 = 32 << 20;
