//! The synchronous inference engine: everything needed to turn a prompt into pixels, with no knowledge of
//! HTTP, tokio or the job store. Usable as a library on its own.

pub mod rng;
pub mod scheduler;
