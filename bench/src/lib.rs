//! Benchmarks of sluice; see benches/ and README.md.
