//! The one integration-test binary: the real server, real SQLite, real child processes.

mod bad_input;
mod browser;
mod campaigns;
mod cli;
mod deploy;
mod disk_full;
mod docker_launcher;
mod docker_support;
mod failures;
mod hardening;
mod helpers;
mod incidents;
mod lifecycle;
mod logs;
mod metrics;
mod python;
mod quickstart;
mod s3;
mod schemathesis;
mod server_restart;
mod slow_clients;
mod slurm;
mod stragglers;
mod trainer;
mod validate;
