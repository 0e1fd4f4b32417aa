//! What one plugin may spend and return: the bounds of a plugin entry (`limits = { ... }`) and
//! the checks of everything a guest hands back. Pure: no wasmtime here, so every rule is tested
//! on plain values.
//!
//! A guest is untrusted, so its output is checked before the node spends anything on it: the
//! byte counts, names and ranks of tensors, and the status and headers of a reply.

use crate::plugin::bindings::WitTensor;
use crate::plugin::outcome::{MAX_OUTPUT_TENSORS, MAX_REPLY_HEADERS, Reply};
use serde::Deserialize;

/// Bounds on one plugin's calls (`limits` in a plugin entry); every field has a default.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PluginLimits {
    /// Bytes a call may return (tensor data, names, shapes, or a reply's body and headers);
    /// default: the plugin's `memory_bytes`.
    pub output_bytes: Option<usize>,
    /// Tensors a call may return (at most [`MAX_OUTPUT_TENSORS`]).
    #[serde(deserialize_with = "at_most::<_, MAX_OUTPUT_TENSORS>")]
    pub output_tensors: usize,
    /// Dimensions of one returned tensor.
    pub tensor_rank: usize,
    /// Bytes of one tensor name.
    pub name_bytes: usize,
    /// Headers of one reply (at most [`MAX_REPLY_HEADERS`]).
    #[serde(deserialize_with = "at_most::<_, MAX_REPLY_HEADERS>")]
    pub reply_headers: usize,
    /// Bytes of one reply header, name and value together.
    pub header_bytes: usize,
    /// Bytes of one `lookup` key; a longer key fails the call.
    pub lookup_key_bytes: usize,
    /// Bytes of one `lookup` table name; a longer name fails the call.
    pub table_name_bytes: usize,
    /// Bytes of one log message; longer ones are cut.
    pub log_message_bytes: usize,
    /// Log lines per second, sustained, across all of this plugin's instances.
    pub log_lines_per_second: u32,
    /// Log lines allowed in a burst above the sustained rate.
    pub log_burst: u32,
    /// Bytes of WASI randomness one call may draw; past it the call fails.
    pub random_bytes: u64,
    /// Bytes one host call may take from the guest, its arguments together (a lookup key and
    /// table name, a log message, one write to stderr or a granted file). A call passing more
    /// fails before anything is copied.
    pub call_argument_bytes: usize,
    /// Host resources (pollables, streams, open files, the request) one instance may hold at
    /// once; creating one more fails the call.
    pub resources: usize,
}

impl Default for PluginLimits {
    fn default() -> Self {
        PluginLimits {
            output_bytes: None,
            output_tensors: 64,
            tensor_rank: 16,
            name_bytes: 256,
            reply_headers: 32,
            header_bytes: 8 << 10,
            lookup_key_bytes: 1 << 10,
            table_name_bytes: 128,
            log_message_bytes: 1 << 10,
            log_lines_per_second: 100,
            log_burst: 200,
            random_bytes: 64 << 10,
            // WASI lets a stream write at most 1 MiB at a time (files; 64 KiB for stdio).
            call_argument_bytes: 1 << 20,
            resources: 4096,
        }
    }
}

/// A count no larger than `MAX`: the most the node lifts out of any guest.
fn at_most<'de, D: serde::Deserializer<'de>, const MAX: usize>(
    deserializer: D,
) -> Result<usize, D::Error> {
    let count = usize::deserialize(deserializer)?;
    if count > MAX {
        return Err(serde::de::Error::custom(format!(
            "{count} is more than any plugin may return ({MAX})"
        )));
    }
    Ok(count)
}

/// Response headers a plugin may not set: HTTP framing, and what the node itself reports.
const RESERVED_HEADERS: &[&str] = &[
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
    "proxy-connection",
    "content-type",
    "server-timing",
    "alt-svc",
    // An authentication challenge for a proxy between the client and the node is the
    // proxy's to send, not an endpoint's.
    "proxy-authenticate",
];

/// True for a header name made of RFC 9110 token characters.
fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// True for a header value of visible ASCII, spaces and tabs (no CR or LF to split headers).
fn is_header_value(value: &str) -> bool {
    value
        .bytes()
        .all(|b| b == b'\t' || (b' '..=b'~').contains(&b))
}

impl PluginLimits {
    /// The output budget of a plugin whose memory is capped at `memory_bytes`.
    pub fn output_budget(&self, memory_bytes: usize) -> usize {
        self.output_bytes.unwrap_or(memory_bytes)
    }

    /// Bytes the node may copy out of the guest when a call returns. wasmtime charges them (its
    /// host-call fuel) before it copies anything, so an oversized answer costs the node
    /// nothing. The room is the output budget plus the host-side form of the most tensors and
    /// headers the checks allow, so that within it the checks, not the fuel, name the bound a
    /// guest overstepped. (The arguments of host calls the guest makes while it runs have
    /// their own, smaller budget: [`PluginLimits::argument_budget`].)
    pub fn copy_budget(&self, output_budget: usize) -> usize {
        let tensor = size_of::<WitTensor>() + self.tensor_rank * 8 + self.name_bytes;
        let header = size_of::<(String, String)>() + self.header_bytes;
        output_budget
            .saturating_add(self.output_tensors.saturating_mul(tensor))
            .saturating_add(self.reply_headers.saturating_mul(header))
            .saturating_add(64 << 10)
    }

    /// Bytes the node may copy out of the guest for one host call's arguments: the larger of
    /// `call_argument_bytes` and what the longest lookup or log message the checks allow
    /// needs, so that within it the checks name the bound.
    pub fn argument_budget(&self) -> usize {
        self.call_argument_bytes
            .max(self.lookup_key_bytes.saturating_add(self.table_name_bytes))
            .max(self.log_message_bytes)
            .saturating_add(4 << 10)
    }

    /// Checks tensors a guest returned; the error says which bound they broke.
    pub fn check_tensors(&self, tensors: &[WitTensor], budget: usize) -> Result<(), String> {
        if tensors.len() > self.output_tensors {
            return Err(format!(
                "returned {} tensors; the limit is {}",
                tensors.len(),
                self.output_tensors
            ));
        }
        let mut total = 0usize;
        for tensor in tensors {
            if tensor.name.len() > self.name_bytes {
                return Err(format!(
                    "returned a tensor name of {} bytes; the limit is {}",
                    tensor.name.len(),
                    self.name_bytes
                ));
            }
            if tensor.shape.len() > self.tensor_rank {
                return Err(format!(
                    "returned a tensor of rank {}; the limit is {}",
                    tensor.shape.len(),
                    self.tensor_rank
                ));
            }
            total = total
                .saturating_add(tensor.data.len())
                .saturating_add(tensor.name.len())
                .saturating_add(tensor.shape.len() * 8);
        }
        within_budget(total, budget)
    }

    /// Checks a reply a guest built: status, headers and size.
    pub fn check_reply(&self, reply: &Reply, budget: usize) -> Result<(), String> {
        if !(200..=599).contains(&reply.status) {
            return Err(format!(
                "replied with status {}; a reply's status is 200 to 599",
                reply.status
            ));
        }
        if !is_header_value(&reply.content_type) {
            return Err("replied with an invalid content-type".into());
        }
        if reply.headers.len() > self.reply_headers {
            return Err(format!(
                "replied with {} headers; the limit is {}",
                reply.headers.len(),
                self.reply_headers
            ));
        }
        let mut total = reply.body.len().saturating_add(reply.content_type.len());
        for (name, value) in reply.headers.iter() {
            let lower = name.to_ascii_lowercase();
            if !is_token(name) || !is_header_value(value) {
                return Err(format!(
                    "replied with an invalid header '{}'",
                    name.escape_debug()
                ));
            }
            if RESERVED_HEADERS.contains(&lower.as_str()) || lower.starts_with("meshserve-") {
                return Err(format!(
                    "replied with header '{lower}', which the node sets itself"
                ));
            }
            let size = name.len() + value.len();
            if size > self.header_bytes {
                return Err(format!(
                    "replied with a header of {size} bytes; the limit is {}",
                    self.header_bytes
                ));
            }
            total = total.saturating_add(size);
        }
        within_budget(total, budget)
    }
}

fn within_budget(total: usize, budget: usize) -> Result<(), String> {
    if total > budget {
        Err(format!(
            "returned {total} bytes; the output limit is {budget}"
        ))
    } else {
        Ok(())
    }
}

/// A log message as it may enter the node's log: at most `max_bytes` (cut at a character
/// boundary, marked), with control characters escaped so a plugin cannot forge log lines or
/// drive a terminal.
pub fn clean_log_message(message: &str, max_bytes: usize) -> String {
    let mut end = message.len().min(max_bytes);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = String::with_capacity(end + 16);
    for c in message[..end].chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    if end < message.len() {
        out.push_str(&format!("… ({} bytes cut)", message.len() - end));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_copy_budget_covers_every_output_the_checks_allow_and_little_more() {
        let limits = PluginLimits::default();
        let output = 1 << 20;
        let copy = limits.copy_budget(output);
        let most_headers =
            limits.reply_headers * (size_of::<(String, String)>() + limits.header_bytes);
        assert!(copy >= output + most_headers, "{copy}");
        assert!(copy < output + (2 << 20), "{copy}");
        assert_eq!(limits.copy_budget(usize::MAX), usize::MAX);
    }

    #[test]
    fn a_host_call_may_take_its_argument_limit_and_what_the_lookup_checks_need() {
        let limits = PluginLimits::default();
        let budget = limits.argument_budget();
        assert!(budget >= limits.call_argument_bytes, "{budget}");
        assert!(budget < limits.call_argument_bytes + (64 << 10), "{budget}");
        let wide = PluginLimits {
            lookup_key_bytes: 4 << 20,
            ..PluginLimits::default()
        };
        assert!(wide.argument_budget() >= (4 << 20) + wide.table_name_bytes);
    }
    use crate::plugin::bindings::Datatype;

    fn tensor(name: &str, rank: usize, bytes: usize) -> WitTensor {
        WitTensor {
            name: name.into(),
            datatype: Datatype::Uint8,
            shape: vec![1; rank],
            data: vec![0; bytes],
        }
    }

    fn reply(status: u16, headers: &[(&str, &str)], body: usize) -> Reply {
        Reply {
            status,
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect::<Vec<_>>()
                .into(),
            content_type: "application/json".into(),
            body: vec![b'x'; body],
        }
    }

    #[test]
    fn a_config_may_not_allow_more_pieces_than_the_node_lifts() {
        let err = toml::from_str::<PluginLimits>("reply_headers = 1025").unwrap_err();
        assert!(
            err.to_string()
                .contains("1025 is more than any plugin may return (1024)")
        );
        let err = toml::from_str::<PluginLimits>("output_tensors = 5000").unwrap_err();
        assert!(err.to_string().contains("(1024)"));
        let most: PluginLimits =
            toml::from_str("reply_headers = 1024\noutput_tensors = 1024").unwrap();
        assert_eq!((most.reply_headers, most.output_tensors), (1024, 1024));
    }

    #[test]
    fn tensors_within_every_bound_pass_and_each_bound_is_enforced() {
        let limits = PluginLimits::default();
        assert!(limits.check_tensors(&[tensor("a", 2, 100)], 1000).is_ok());
        let err = limits
            .check_tensors(&[tensor("a", 2, 2000)], 1000)
            .unwrap_err();
        assert!(err.contains("output limit is 1000"), "{err}");
        let many: Vec<_> = (0..65).map(|_| tensor("a", 1, 1)).collect();
        assert!(
            limits
                .check_tensors(&many, 1 << 20)
                .unwrap_err()
                .contains("65 tensors")
        );
        let deep = tensor("a", 17, 1);
        assert!(
            limits
                .check_tensors(&[deep], 1 << 20)
                .unwrap_err()
                .contains("rank 17")
        );
        let long = tensor(&"n".repeat(257), 1, 1);
        assert!(
            limits
                .check_tensors(&[long], 1 << 20)
                .unwrap_err()
                .contains("257 bytes")
        );
    }

    #[test]
    fn replies_are_checked_for_status_headers_and_size() {
        let limits = PluginLimits::default();
        assert!(
            limits
                .check_reply(&reply(418, &[("x-why", "teapot")], 10), 100)
                .is_ok()
        );
        assert!(
            limits
                .check_reply(&reply(101, &[], 0), 100)
                .unwrap_err()
                .contains("101")
        );
        assert!(
            limits
                .check_reply(&reply(200, &[], 200), 100)
                .unwrap_err()
                .contains("output limit")
        );
        for framing in [
            "Content-Length",
            "transfer-encoding",
            "meshserve-route",
            "server-timing",
            "Proxy-Authenticate",
        ] {
            let err = limits
                .check_reply(&reply(200, &[(framing, "1")], 0), 100)
                .unwrap_err();
            assert!(err.contains("sets itself"), "{framing}: {err}");
        }
        let split = limits.check_reply(&reply(200, &[("x-a", "1\r\nx-b: 2")], 0), 100);
        assert!(split.unwrap_err().contains("invalid header"));
        let bad_name = limits.check_reply(&reply(200, &[("x a", "1")], 0), 100);
        assert!(bad_name.unwrap_err().contains("invalid header"));
    }

    #[test]
    fn log_messages_are_cut_and_cannot_forge_lines() {
        let clean = clean_log_message("ok\n2026 ERROR forged\u{1b}[31m", 1024);
        assert!(
            !clean.contains('\n') && !clean.contains('\u{1b}'),
            "{clean}"
        );
        assert!(clean.contains("\\n2026 ERROR forged"), "{clean}");
        let long = clean_log_message(&"é".repeat(1000), 101);
        assert!(
            long.starts_with(&"é".repeat(50)) && long.contains("bytes cut"),
            "{long}"
        );
        assert!(long.len() < 140);
    }
}
