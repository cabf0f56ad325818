//! Any input: the parser returns a compiled policy or diagnostics, never panics, and every
//! diagnostic has a 1-based position. Accepted input compiles and expands into map entries,
//! and the reference evaluator can decide on it.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(src) = std::str::from_utf8(data) else {
        return;
    };
    match corral_policy::compile_str("fuzz.yaml", src, 1) {
        Ok(c) => {
            for p in &c.policies {
                let _ = corral_policy::compiled::expand(0, p, 1);
                let call = corral_policy::eval::ConnectCall {
                    addr: std::net::IpAddr::from([127, 0, 0, 1]),
                    port: 443,
                    proto: 6,
                };
                let _ = corral_policy::eval::connect(Some(p), &Default::default(), &call, 0);
            }
        }
        Err(e) => {
            for d in e.diagnostics() {
                assert!(d.pos.line >= 1 && d.pos.col >= 1, "bad position in {d}");
            }
        }
    }
});
