-- Failed logins are counted per account *and* client address (an IPv6 client by its /64), so
-- that a stranger's guesses pause only the stranger: before, eleven wrong passwords from
-- anywhere locked the owner out too. The old per-account windows are short-lived and simply
-- dropped.
DROP TABLE login_failures;
CREATE TABLE login_failures (
    username     TEXT NOT NULL,
    client       TEXT NOT NULL,
    window_start BIGINT NOT NULL,
    failures     BIGINT NOT NULL,
    PRIMARY KEY (username, client)
);
