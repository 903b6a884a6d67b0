//! PROXY protocol v1/v2 header: read exactly (no byte of the TLS hello behind it), then parsed.
#![no_main]

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use imapgate::server::proxy::{self, V1_MAX, V2_MAX_BODY};
use libfuzzer_sys::fuzz_target;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let peer: SocketAddr = "192.0.2.7:40000".parse().unwrap();
    let mut reader = data;
    let res = runtime().block_on(proxy::read_header(
        &mut reader,
        peer,
        Duration::from_secs(5),
    ));
    let consumed = data.len() - reader.len();
    // Never more than the largest header the reader allows.
    assert!(consumed <= (16 + V2_MAX_BODY).max(V1_MAX));
    if res.is_ok() {
        let header = &data[..consumed];
        // A v1 header ends at its CRLF; a v2 header at its declared length. Nothing after it
        // was taken from the stream.
        if header.starts_with(b"PROXY ") {
            assert!(header.ends_with(b"\r\n"));
            assert_eq!(header.windows(2).filter(|w| w == b"\r\n").count(), 1);
        } else {
            let len = u16::from_be_bytes([header[14], header[15]]) as usize;
            assert_eq!(consumed, 16 + len);
        }
        // Parsing the same bytes on their own gives the same answer.
        assert_eq!(proxy::parse(header, peer), res);
    }
    // The pure parser on arbitrary input never panics either.
    let _ = proxy::parse(data, peer);
});
