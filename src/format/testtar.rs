//! A minimal tar builder for unit tests (PAX records for long or non-ASCII names and xattrs).

use super::tar::{padding, put_octal, ustar_file_header, BLOCK};

/// A minimal tar builder for tests (PAX headers for long names and xattrs).
#[derive(Debug, Default)]
pub(crate) struct TestTar {
    pub out: Vec<u8>,
}

#[derive(Debug, Clone)]
pub(crate) struct TestEntry {
    pub name: String,
    pub typeflag: u8,
    pub mode: u32,
    pub link: String,
    pub data: Vec<u8>,
    pub xattrs: Vec<(String, Vec<u8>)>,
}

impl TestTar {
    fn header(name: &str, link: &str, typeflag: u8, mode: u32, size: u64) -> [u8; BLOCK] {
        let mut h = ustar_file_header("", size, mode);
        h[..100].fill(0);
        let n = name.as_bytes();
        h[..n.len().min(100)].copy_from_slice(&n[..n.len().min(100)]);
        let l = link.as_bytes();
        h[157..157 + l.len().min(100)].copy_from_slice(&l[..l.len().min(100)]);
        h[156] = typeflag;
        put_octal(&mut h[108..116], 1000);
        put_octal(&mut h[116..124], 1000);
        put_octal(&mut h[136..148], 1_700_000_000);
        h[148..156].fill(b' ');
        let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        h
    }

    fn pax_record(key: &str, val: &[u8]) -> Vec<u8> {
        let body_len = key.len() + val.len() + 3;
        let mut len = body_len + 1;
        while format!("{len}").len() + body_len != len {
            len = format!("{len}").len() + body_len;
        }
        let mut r = format!("{len} {key}=").into_bytes();
        r.extend_from_slice(val);
        r.push(b'\n');
        r
    }

    pub fn add(&mut self, e: &TestEntry) {
        let mut pax = Vec::new();
        if e.name.len() > 100 || !e.name.is_ascii() {
            pax.extend(Self::pax_record("path", e.name.as_bytes()));
        }
        if e.link.len() > 100 || !e.link.is_ascii() {
            pax.extend(Self::pax_record("linkpath", e.link.as_bytes()));
        }
        for (k, v) in &e.xattrs {
            pax.extend(Self::pax_record(&format!("SCHILY.xattr.{k}"), v));
        }
        if !pax.is_empty() {
            let h = Self::header("PaxHeader", "", b'x', 0o644, pax.len() as u64);
            self.out.extend_from_slice(&h);
            let n = pax.len() as u64;
            self.out.extend(pax);
            self.out.extend(std::iter::repeat_n(0u8, padding(n)));
        }
        let short: String = e.name.chars().filter(|c| c.is_ascii()).take(90).collect();
        let link: String = e.link.chars().filter(|c| c.is_ascii()).take(90).collect();
        let h = Self::header(&short, &link, e.typeflag, e.mode, e.data.len() as u64);
        self.out.extend_from_slice(&h);
        self.out.extend_from_slice(&e.data);
        self.out
            .extend(std::iter::repeat_n(0u8, padding(e.data.len() as u64)));
    }

    /// A PAX global header holding `key=value`.
    pub fn global(&mut self, key: &str, value: &[u8]) {
        let rec = Self::pax_record(key, value);
        let h = Self::header("GlobalHead", "", b'g', 0o644, rec.len() as u64);
        self.out.extend_from_slice(&h);
        let n = rec.len() as u64;
        self.out.extend(rec);
        self.out.extend(std::iter::repeat_n(0u8, padding(n)));
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.out.extend([0u8; 1024]);
        self.out
    }
}
