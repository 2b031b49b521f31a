-- The sessions signed out, so that none is trusted again: a request still in flight at sign-out
-- saves the session it loaded when it ends (the session store's save is an upsert), which brings
-- the deleted session back; the portal refuses (and deletes) a session listed here. A session is
-- identified by the SHA-256 of its id (`sha256:<hex>`), never the id itself, the cookie's value.
-- A row is kept until the session's absolute lifetime has passed (`expires_at`, Unix seconds),
-- after which the session is refused anyway; the rows past it are deleted at the next sign-out.
CREATE TABLE signed_out_sessions (
    session_hash TEXT PRIMARY KEY,
    expires_at   BIGINT NOT NULL
);
CREATE INDEX signed_out_sessions_expires_at ON signed_out_sessions (expires_at);
