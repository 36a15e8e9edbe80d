//! The bridge between the async server and the synchronous engine: worker threads and the dispatcher that
//! feeds them from the job store.

pub mod dispatcher;
pub mod layout;
pub mod pool;
