//! How a rank's process is started, watched and stopped. `local` runs ranks as child processes
//! of the server.

pub mod local;
