//! Support code shared by the integration tests: real servers on 127.0.0.1 that tests start on
//! first use (an S3 API server behind a counting proxy, CloudWatch, an IMDSv2 stand-in), and
//! running the real binary against them.

// The suite uses only a part of `common` at a time.
#![allow(dead_code)]

pub mod cloudwatch;
pub mod garage;
pub mod imds;
pub mod process;
pub mod proxy;
pub mod run;
pub mod s3;
pub mod slowfs;
pub mod sqs;
pub mod wait;
pub mod worker;
