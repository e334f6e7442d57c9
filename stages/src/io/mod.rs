//! Reading and writing tables: whole ([`table`]), a row range at a time ([`partition`]), and
//! the row-level helpers both use ([`rows`]).

pub mod partition;
pub mod rows;
pub mod table;
