//! DNS messages as the responder parses and answers them: a query that parses gets an error
//! answer with its own id that parses as a response, and truncation for UDP never grows an
//! answer past the client's limit (beyond the header and question it keeps).

#![no_main]

use libfuzzer_sys::fuzz_target;
use mse_vpn::dns::wire;

fuzz_target!(|data: &[u8]| {
    let _ = wire::id(data);
    let _ = wire::is_response(data);
    let Ok(query) = wire::Query::parse(data) else {
        return;
    };
    let answer = wire::error_answer(data, &query, 2);
    assert_eq!(wire::id(&answer), wire::id(data), "the answer keeps the query's id");
    assert!(wire::is_response(&answer));
    let limit = query.udp_limit;
    let cut = wire::truncate_for_udp(answer.clone(), limit);
    assert!(cut.len() <= answer.len().max(limit), "truncation grew the answer");
    let mut renumbered = data.to_vec();
    wire::set_id(&mut renumbered, 0x1234);
    assert_eq!(wire::id(&renumbered), Some(0x1234));
});
