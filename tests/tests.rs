//! corecast's integration tests: one binary, the real relay over real sockets.

mod admin;
mod backpressure;
mod cluster;
mod config;
mod fanout;
mod ops;
mod policy;
mod regression;
mod shards;
mod startup;
mod util;
mod wire;
