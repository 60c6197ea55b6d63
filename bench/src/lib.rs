//! Benchmarks of sluice; see benches/ and docs/bench/README.md.
