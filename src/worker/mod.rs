//! The bridge between the async server and the synchronous engine: worker threads, the dispatcher that
//! feeds them from the job store, and the live progress board.

pub mod dispatcher;
pub mod events;
pub mod pool;
pub mod progress;
