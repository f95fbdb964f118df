pub mod actors;
pub mod api;
pub mod api_token;
pub mod bench;
pub mod bus;
pub mod checkpoint;
pub mod cli;
pub mod client;
pub mod config;
pub mod domain;
pub mod fuzz;
pub mod launcher;
pub mod metrics;
pub mod pressure;
pub mod spec;
pub mod startup;
pub mod storage;
pub mod store;
pub mod telemetry;
pub mod trainer;
pub mod untrusted;
pub mod validate;

#[cfg(test)]
mod architecture;
