-- Dead letters: committed row changes evictd could not resolve (a look-up
-- that failed definitely or kept failing), kept for an operator to read and
-- replay. evictd runs its migrations with `search_path` set to its own schema
-- (`dead_letter.schema`, default `evictd`), so every name here is created
-- there, never in the application's `public`.
CREATE TABLE dead_letters (
    id          bigserial   PRIMARY KEY,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    -- Which kind of source the change came from: postgres, kafka, file.
    source      text        NOT NULL,
    -- The change's position as evictd prints it (`pg:COMMIT_LSN:LSN`).
    position    text        NOT NULL,
    -- Postgres: the commit LSN of the change's transaction.
    lsn         pg_lsn,
    -- `schema.table` and insert, update, delete or truncate.
    table_name  text        NOT NULL,
    op          text        NOT NULL,
    -- Row images, column → value; a value the source did not send (unchanged
    -- TOAST, no old image) is {"unknown": true}, bytea is hex text.
    before      jsonb,
    after       jsonb,
    error       text        NOT NULL,
    -- Why, in one word: lookup_failed, lookup_attempts_exhausted.
    error_kind  text        NOT NULL,
    -- How many times the change's look-ups were run before it was given up.
    attempts    integer     NOT NULL,
    -- A change replayed after a crash (recorded, not yet acknowledged) is
    -- recorded once.
    UNIQUE (source, position, table_name)
);

CREATE INDEX dead_letters_recorded_at ON dead_letters (recorded_at);
