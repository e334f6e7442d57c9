//! The stage graph: building and checking it ([`dag`]), drawing it ([`draw`]), and the columns
//! each table output will have ([`columns`]).

pub mod columns;
pub mod dag;
pub mod draw;

pub use dag::Dag;
