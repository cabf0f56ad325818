//! JSON-lines audit log with size-based rotation (`FILE` → `FILE.1`).

use std::{io::Write as _, path::PathBuf, sync::Arc};

use corral_events::{hub::HubEvent, render};

pub struct AuditLog {
    path: PathBuf,
    max: u64,
    out: Option<std::io::BufWriter<std::fs::File>>,
    size: u64,
    line: Vec<u8>,
}

impl AuditLog {
    pub fn open(path: PathBuf, max: u64) -> std::io::Result<Self> {
        let mut a = Self {
            path,
            max: max.max(4096),
            out: None,
            size: 0,
            line: Vec::new(),
        };
        a.reopen()?;
        Ok(a)
    }

    fn reopen(&mut self) -> std::io::Result<()> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.size = f.metadata()?.len();
        self.out = Some(std::io::BufWriter::new(f));
        Ok(())
    }

    pub fn write(&mut self, events: &[Arc<HubEvent>]) -> std::io::Result<()> {
        for e in events {
            if self.size >= self.max {
                if let Some(mut o) = self.out.take() {
                    o.flush()?;
                }
                let mut rotated = self.path.clone().into_os_string();
                rotated.push(".1");
                std::fs::rename(&self.path, rotated)?;
                self.reopen()?;
            }
            let event = e.to_pb().map_err(std::io::Error::other)?;
            self.line.clear();
            serde_json::to_writer(&mut self.line, &render::event_json(&event, None))?;
            self.line.push(b'\n');
            let out = match self.out.as_mut() {
                Some(o) => o,
                None => {
                    self.reopen()?;
                    self.out
                        .as_mut()
                        .ok_or_else(|| std::io::Error::other("audit log not open"))?
                }
            };
            out.write_all(&self.line)?;
            self.size += self.line.len() as u64;
        }
        match self.out.as_mut() {
            Some(o) => o.flush(),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use corral_proto::v1 as pb;

    #[test]
    fn audit_log_rotates_by_size() -> std::io::Result<()> {
        let dir = std::env::temp_dir().join(format!("corral-audit-{}", std::process::id()));
        let path = dir.join("audit.jsonl");
        let mut a = AuditLog::open(path.clone(), 4096)?;
        let e = pb::Event {
            seq: 1,
            ..Default::default()
        };
        let len = render::event_json(&e, None).to_string().len() + 1;
        let n = 4096 / len + 3;
        let shared = Arc::new(HubEvent::from_pb(&e));
        let batch: Vec<_> = (0..n).map(|_| shared.clone()).collect();
        a.write(&batch)?;
        let rotated = dir.join("audit.jsonl.1");
        assert!(rotated.exists(), "rotated once past 4096 bytes");
        let cur = std::fs::read_to_string(&path)?;
        let old = std::fs::read_to_string(&rotated)?;
        assert_eq!(cur.lines().count() + old.lines().count(), n);
        assert!(old.len() as u64 >= 4096);
        for l in cur.lines() {
            let v: serde_json::Value = serde_json::from_str(l)?;
            assert_eq!(v["seq"], 1);
        }
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
