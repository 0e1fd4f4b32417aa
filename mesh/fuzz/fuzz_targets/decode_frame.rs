//! Any bytes from the network: the frame decoder must answer a message or an error, and a
//! message it accepts must survive a round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshserve::wire;

fuzz_target!(|data: &[u8]| {
    if let Ok(message) = wire::decode(data, 1 << 20) {
        let again = wire::encode(&message);
        assert_eq!(wire::decode(&again, 1 << 20).ok(), Some(message));
    }
});
