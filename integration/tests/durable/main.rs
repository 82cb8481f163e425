//! Durable jobs against real storages, in one test binary: a real SQLite file
//! ([`sqlite`]), a real PostgreSQL server ([`postgres`], given by
//! `TOWER_BACKGROUND_POSTGRES`, else skipped), and a server killed with SIGKILL
//! ([`crash`]). `metrics` stays a binary of its own: it installs the process's recorder.

#[path = "../../../tests/common/mod.rs"]
mod common;
mod durable_common;

#[cfg(unix)]
mod crash;
mod postgres;
mod sqlite;
