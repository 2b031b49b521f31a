//! Compressed bodies on SQLite, readable by plain SQL.
//!
//! Request and response bodies are stored the way SQLite's own archive format ("sqlar") stores a
//! file: zlib-compressed (RFC 1950) when that makes them smaller, as they are otherwise, always as
//! a BLOB, with the original size in a column beside them. The SQL function
//! `sqlar_uncompress(data, size)` gives the original back: `data` unchanged when `size` is not
//! positive or equals its length, else `data` inflated to `size` bytes. The view
//! `ApiManagementGatewayLogs` calls it, so its `BackendRequestBody` and `BackendResponseBody` read
//! as text:
//!
//! - on the store's own connections, where [`register`] installs the function below;
//! - in the `sqlite3` command-line shell, which has `sqlar_uncompress` built in (when built with
//!   zlib, as Debian's is), so that an auditor can open the file and run the same queries.
//!
//! Bodies written before compression (TEXT values, no size) pass through unchanged.
//!
//! sqlx has no safe way to add an SQL function, so this module calls SQLite's C API
//! (`sqlite3_create_function_v2`) on the connection's raw handle, as sqlx itself does for its
//! `regexp` function. It is the only module of the workspace that uses `unsafe`.
#![allow(
    unsafe_code,
    reason = "registers an SQL function through SQLite's C API"
)]

use std::ffi::{c_char, c_int};

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use libsqlite3_sys as ffi;
use sqlx::SqliteConnection;

/// Bodies larger than this are refused by `sqlar_uncompress` (the size column of a damaged or
/// altered row must not make the reader allocate without bound). The gateway captures far less.
const MAX_INFLATED_BYTES: i64 = 1 << 30;

/// Bodies shorter than this are stored as they are: zlib's header and checksum would eat the gain.
const MIN_COMPRESSED_BYTES: usize = 64;

/// A body as stored: the bytes for the BLOB column and the original size for the size column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StoredBody {
    /// zlib-compressed bytes, or the original bytes when compression did not make them smaller.
    pub data: Vec<u8>,
    /// The original size in bytes.
    pub size: i64,
}

/// Compresses bodies for storage at zlib level 1, the cheapest: compression runs beside the
/// store's writer on a machine that also serves calls. Azure's example `chat.completion` answer
/// shrinks to 39 % at that level, the benchmark's random-word bodies to 63–77 %. One compressor
/// serves a whole batch, so that zlib's tables are set up once.
pub(crate) struct BodyCompressor {
    encoder: Compress,
}

impl BodyCompressor {
    /// A compressor at zlib level 1, with the zlib header and checksum (RFC 1950), as sqlar.
    pub(crate) fn new() -> BodyCompressor {
        BodyCompressor {
            encoder: Compress::new(Compression::fast(), true),
        }
    }

    /// The stored form of `body`.
    pub(crate) fn compress(&mut self, body: &str) -> StoredBody {
        let bytes = body.as_bytes();
        let size = i64::try_from(bytes.len()).unwrap_or(i64::MAX);
        let as_is = || StoredBody {
            data: bytes.to_vec(),
            size,
        };
        if bytes.len() < MIN_COMPRESSED_BYTES {
            return as_is();
        }
        // Room for the whole input: output that is not smaller is not used.
        let mut out = Vec::with_capacity(bytes.len());
        self.encoder.reset();
        match self
            .encoder
            .compress_vec(bytes, &mut out, FlushCompress::Finish)
        {
            Ok(Status::StreamEnd) if out.len() < bytes.len() => StoredBody { data: out, size },
            _ => as_is(),
        }
    }
}

/// What `sqlar_uncompress` does, in safe Rust: `data` inflated to `size` bytes.
fn inflate(data: &[u8], size: i64) -> Result<Vec<u8>, &'static std::ffi::CStr> {
    if size > MAX_INFLATED_BYTES {
        return Err(c"sqlar_uncompress: the recorded size is larger than any stored body");
    }
    let size = usize::try_from(size).map_err(|_| c"sqlar_uncompress: negative size")?;
    let mut out = Vec::with_capacity(size);
    let mut decoder = Decompress::new(true);
    match decoder.decompress_vec(data, &mut out, FlushDecompress::Finish) {
        Ok(Status::StreamEnd) if out.len() == size => Ok(out),
        _ => Err(c"sqlar_uncompress: the stored body does not inflate to its recorded size"),
    }
}

/// Installs `sqlar_uncompress(data, size)` on `connection` (pass it to the pool's
/// `after_connect`).
pub(crate) async fn register(connection: &mut SqliteConnection) -> Result<(), sqlx::Error> {
    let mut handle = connection.lock_handle().await?;
    let db = handle.as_raw_handle().as_ptr();
    // SAFETY: `db` is the open connection's handle, held exclusively through `handle` for the
    // call. The name is NUL-terminated and static; no user data and no destructor are passed;
    // `uncompress` has the signature SQLite expects of a scalar function of 2 arguments.
    let code = unsafe {
        ffi::sqlite3_create_function_v2(
            db,
            c"sqlar_uncompress".as_ptr(),
            2,
            ffi::SQLITE_UTF8 | ffi::SQLITE_DETERMINISTIC | ffi::SQLITE_INNOCUOUS,
            std::ptr::null_mut(),
            Some(uncompress),
            None,
            None,
            None,
        )
    };
    if code == ffi::SQLITE_OK {
        Ok(())
    } else {
        Err(sqlx::Error::Protocol(format!(
            "could not register sqlar_uncompress on the audit store's connection (SQLite error {code})"
        )))
    }
}

/// The C entry point of `sqlar_uncompress(data, size)`.
unsafe extern "C" fn uncompress(
    context: *mut ffi::sqlite3_context,
    argc: c_int,
    argv: *mut *mut ffi::sqlite3_value,
) {
    if argc != 2 {
        // SAFETY: `context` is the call's context, valid for the duration of the call.
        unsafe {
            ffi::sqlite3_result_error(context, c"sqlar_uncompress takes 2 arguments".as_ptr(), -1);
        }
        return;
    }
    // SAFETY: SQLite passes `argc` (= 2) valid value pointers in `argv`.
    let (data, size) = unsafe { (*argv, *argv.add(1)) };
    // SAFETY: `size` and `data` are valid values for the duration of the call. For a BLOB,
    // `sqlite3_value_blob` followed by `sqlite3_value_bytes` is the order SQLite documents as
    // safe; the pointer stays valid until the function returns, and the slice is not kept.
    let outcome = unsafe {
        let size = ffi::sqlite3_value_int64(size);
        if ffi::sqlite3_value_type(data) != ffi::SQLITE_BLOB {
            // NULL, or a body stored before compression (TEXT): as it is.
            None
        } else {
            let pointer = ffi::sqlite3_value_blob(data).cast::<u8>();
            let length = usize::try_from(ffi::sqlite3_value_bytes(data)).unwrap_or(0);
            if size <= 0 || i64::try_from(length) == Ok(size) {
                None
            } else {
                let bytes: &[u8] = if pointer.is_null() || length == 0 {
                    &[]
                } else {
                    std::slice::from_raw_parts(pointer, length)
                };
                // A panic must not unwind into SQLite's C frames.
                Some(
                    std::panic::catch_unwind(|| inflate(bytes, size))
                        .unwrap_or(Err(c"sqlar_uncompress: internal error")),
                )
            }
        }
    };
    // SAFETY: `context` and `data` are valid for the call; SQLITE_TRANSIENT makes SQLite copy
    // the bytes before `inflated` is dropped; error messages are static NUL-terminated strings.
    unsafe {
        match outcome {
            None => ffi::sqlite3_result_value(context, data),
            Some(Ok(inflated)) => ffi::sqlite3_result_blob64(
                context,
                inflated.as_ptr().cast(),
                inflated.len() as u64,
                ffi::SQLITE_TRANSIENT(),
            ),
            Some(Err(message)) => {
                ffi::sqlite3_result_error(context, message.as_ptr().cast::<c_char>(), -1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compress(body: &str) -> StoredBody {
        BodyCompressor::new().compress(body)
    }

    #[test]
    fn text_bodies_shrink_and_inflate_back() {
        let body = r#"{"messages":[{"role":"user","content":"summarise invoice 4711 for the quarterly review"}]}"#
            .repeat(20);
        let stored = compress(&body);
        assert!(stored.data.len() * 3 < body.len(), "{}", stored.data.len());
        assert_eq!(stored.size, body.len() as i64);
        assert_eq!(inflate(&stored.data, stored.size).unwrap(), body.as_bytes());
    }

    #[test]
    fn short_or_incompressible_bodies_are_kept_as_they_are() {
        let short = compress("{}");
        assert_eq!(short.data, b"{}");
        assert_eq!(short.size, 2);
        // 64 distinct characters: deflate has nothing to repeat, and zlib's framing adds bytes.
        let noise = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+/";
        let stored = compress(noise);
        assert_eq!(stored.data, noise.as_bytes());
    }

    #[test]
    fn one_compressor_serves_many_bodies() {
        let mut compressor = BodyCompressor::new();
        let bodies = [
            "first body, first body, first body, first body, first body, first body".to_owned(),
            "{}".to_owned(),
            "second body with other words, second body with other words".repeat(5),
        ];
        for body in &bodies {
            let stored = compressor.compress(body);
            // As sqlar_uncompress reads it: as it is when the size is the stored length.
            let read = if stored.data.len() as i64 == stored.size {
                stored.data
            } else {
                inflate(&stored.data, stored.size).unwrap()
            };
            assert_eq!(read, body.as_bytes());
        }
    }

    #[test]
    fn a_wrong_size_or_damaged_data_is_an_error() {
        let body = "the same words again and again ".repeat(10);
        let stored = compress(&body);
        assert!(inflate(&stored.data, stored.size + 1).is_err());
        assert!(inflate(&stored.data, stored.size - 1).is_err());
        assert!(inflate(&stored.data[..stored.data.len() / 2], stored.size).is_err());
        assert!(inflate(&stored.data, MAX_INFLATED_BYTES + 1).is_err());
    }
}
