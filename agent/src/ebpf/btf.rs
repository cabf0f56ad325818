//! Kernel structure offsets from the kernel's BTF (`/sys/kernel/btf/vmlinux`).
//!
//! aya's Rust programs have no CO-RE relocations, so the exec programs read kernel fields with
//! `bpf_probe_read_kernel` at offsets computed here at load time and handed over in the
//! `EXEC_CFG` map. This is a small reader of the BTF type section: it finds a struct by name
//! and a member by name (looking through anonymous struct/union members), which is all the
//! offsets need. aya-obj parses BTF too but does not expose member lookup.

use std::path::{Path, PathBuf};

use agent_common::{
    EXEC_CONFIG_VALID, ExecConfig, SCRIPT_CONFIG_VALID, SOCK_CGROUP_CONFIG_VALID, ScriptConfig,
    SockCgroupConfig,
};

/// Where the kernel publishes its own BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";
/// Kernel symbol addresses (root sees real addresses unless `kptr_restrict` is 2).
pub const KALLSYMS: &str = "/proc/kallsyms";
/// The deferred-fput task work whose pending entries hold a `#!` script's file.
pub const FPUT_TASK_WORK: &str = "____fput";

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("read kernel BTF {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel BTF is malformed: {0}")]
    Malformed(&'static str),
    #[error("kernel BTF has no struct {0}")]
    NoStruct(String),
    #[error("kernel BTF: struct {strukt} has no member {member}")]
    NoMember { strukt: String, member: String },
    #[error("kernel BTF: {0} is a bitfield")]
    Bitfield(String),
    #[error("read kernel symbols {path}")]
    Kallsyms {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel symbol {0} not found (or its address is hidden by kptr_restrict)")]
    NoSymbol(&'static str),
}

/// Address of the text symbol `name` in kallsyms-format `text` (`None` if absent or zero,
/// as `kptr_restrict` shows hidden addresses).
pub fn symbol_address(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (addr, kind, sym) = (f.next()?, f.next()?, f.next()?);
        // Module symbols carry a fourth field ("[module]"): only the core kernel's here.
        if sym != name || f.next().is_some() || !matches!(kind, "t" | "T") {
            return None;
        }
        u64::from_str_radix(addr, 16).ok().filter(|a| *a != 0)
    })
}

/// Address of `name` in `/proc/kallsyms`.
pub fn kernel_symbol(name: &'static str) -> Result<u64, BtfError> {
    let text = std::fs::read_to_string(KALLSYMS).map_err(|source| BtfError::Kallsyms {
        path: KALLSYMS.into(),
        source,
    })?;
    symbol_address(&text, name).ok_or(BtfError::NoSymbol(name))
}

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

struct Member {
    name_off: u32,
    type_id: u32,
    /// Bit offset (bitfields excluded: `bitfield_size` != 0).
    bit_offset: u32,
    bitfield_size: u32,
}

struct Type {
    name_off: u32,
    kind: u32,
    /// For modifiers/typedefs: the referenced type.
    type_ref: u32,
    members: Vec<Member>,
}

/// Parsed kernel BTF: types (index = type id) and the string table.
pub struct KernelBtf {
    types: Vec<Type>,
    strings: Vec<u8>,
}

fn u32_at(b: &[u8], off: usize) -> Result<u32, BtfError> {
    b.get(off..off + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or(BtfError::Malformed("truncated"))
}

impl KernelBtf {
    /// Reads `/sys/kernel/btf/vmlinux`.
    pub fn from_sys_fs() -> Result<Self, BtfError> {
        Self::from_file(Path::new(VMLINUX_BTF))
    }

    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let data = std::fs::read(path).map_err(|source| BtfError::Read {
            path: path.into(),
            source,
        })?;
        Self::parse(&data)
    }

    /// Parses little-endian BTF (the only kind the BPF target here produces and reads).
    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        if data.get(0..2) != Some(&[0x9f, 0xeb]) {
            return Err(BtfError::Malformed("bad magic (not little-endian BTF)"));
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let type_off = u32_at(data, 8)? as usize;
        let type_len = u32_at(data, 12)? as usize;
        let str_off = u32_at(data, 16)? as usize;
        let str_len = u32_at(data, 20)? as usize;
        let types_bytes = data
            .get(hdr_len + type_off..hdr_len + type_off + type_len)
            .ok_or(BtfError::Malformed("type section out of bounds"))?;
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or(BtfError::Malformed("string section out of bounds"))?
            .to_vec();
        // Type id 0 is `void`.
        let mut types = vec![Type {
            name_off: 0,
            kind: 0,
            type_ref: 0,
            members: Vec::new(),
        }];
        let mut pos = 0usize;
        while pos < types_bytes.len() {
            let name_off = u32_at(types_bytes, pos)?;
            let info = u32_at(types_bytes, pos + 4)?;
            let size_or_type = u32_at(types_bytes, pos + 8)?;
            pos += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            let mut members = Vec::new();
            let extra = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        let m = pos + i * 12;
                        let off = u32_at(types_bytes, m + 8)?;
                        let (bit_offset, bitfield_size) = if kind_flag {
                            (off & 0xff_ffff, off >> 24)
                        } else {
                            (off, 0)
                        };
                        members.push(Member {
                            name_off: u32_at(types_bytes, m)?,
                            type_id: u32_at(types_bytes, m + 4)?,
                            bit_offset,
                            bitfield_size,
                        });
                    }
                    vlen * 12
                }
                KIND_ENUM | KIND_FUNC_PROTO => vlen * 8,
                KIND_DATASEC | KIND_ENUM64 => vlen * 12,
                _ => 0,
            };
            pos += extra;
            types.push(Type {
                name_off,
                kind,
                type_ref: size_or_type,
                members,
            });
        }
        Ok(Self { types, strings })
    }

    fn name(&self, off: u32) -> &[u8] {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        &rest[..end]
    }

    fn struct_id(&self, name: &str) -> Result<u32, BtfError> {
        self.types
            .iter()
            .position(|t| {
                t.kind == KIND_STRUCT
                    && !t.members.is_empty()
                    && self.name(t.name_off) == name.as_bytes()
            })
            .and_then(|i| u32::try_from(i).ok())
            .ok_or_else(|| BtfError::NoStruct(name.into()))
    }

    /// Follows typedefs and qualifiers to the underlying type id.
    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..32 {
            match self.types.get(id as usize) {
                Some(t)
                    if matches!(
                        t.kind,
                        KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG
                    ) =>
                {
                    id = t.type_ref;
                }
                _ => break,
            }
        }
        id
    }

    /// Byte offset and type id of `member` in the struct/union `id`, searching anonymous
    /// members too.
    fn member_in(&self, id: u32, member: &str, depth: u32) -> Option<(u32, u32)> {
        let t = self.types.get(self.resolve(id) as usize)?;
        if !matches!(t.kind, KIND_STRUCT | KIND_UNION) || depth > 8 {
            return None;
        }
        for m in &t.members {
            let name = self.name(m.name_off);
            if name == member.as_bytes() {
                if m.bitfield_size != 0 || m.bit_offset % 8 != 0 {
                    return None;
                }
                return Some((m.bit_offset / 8, m.type_id));
            }
            if name.is_empty()
                && let Some((off, ty)) = self.member_in(m.type_id, member, depth + 1)
            {
                if m.bit_offset % 8 != 0 {
                    return None;
                }
                return Some((m.bit_offset / 8 + off, ty));
            }
        }
        None
    }

    /// Byte offset of a dotted member path in struct `strukt`, e.g. `("file", "f_path.dentry")`.
    pub fn offset(&self, strukt: &str, path: &str) -> Result<u32, BtfError> {
        let mut id = self.struct_id(strukt)?;
        let mut total = 0u32;
        for part in path.split('.') {
            let (off, ty) = self
                .member_in(id, part, 0)
                .ok_or_else(|| BtfError::NoMember {
                    strukt: strukt.into(),
                    member: path.into(),
                })?;
            total += off;
            id = ty;
        }
        Ok(total)
    }

    /// Whether type id `id` (after typedefs) is a pointer; used to sanity-check members the
    /// programs dereference.
    fn is_ptr_member(&self, strukt: &str, member: &str) -> bool {
        self.struct_id(strukt)
            .ok()
            .and_then(|id| self.member_in(id, member, 0))
            .and_then(|(_, ty)| self.types.get(self.resolve(ty) as usize))
            .is_some_and(|t| t.kind == KIND_PTR)
    }

    /// Each `(struct, member)` is a pointer member: the programs dereference it.
    fn check_pointers(&self, members: &[(&str, &str)]) -> Result<(), BtfError> {
        for (s, m) in members {
            if !self.is_ptr_member(s, m) {
                return Err(BtfError::NoMember {
                    strukt: (*s).into(),
                    member: format!("{m} (as a pointer)"),
                });
            }
        }
        Ok(())
    }

    /// Every offset the exec programs need.
    pub fn exec_config(&self) -> Result<ExecConfig, BtfError> {
        self.check_pointers(&[
            ("linux_binprm", "file"),
            ("file", "f_inode"),
            ("inode", "i_sb"),
            ("dentry", "d_parent"),
            ("dentry", "d_inode"),
            ("task_struct", "mm"),
        ])?;
        Ok(ExecConfig {
            valid: EXEC_CONFIG_VALID,
            bprm_file: self.offset("linux_binprm", "file")?,
            bprm_filename: self.offset("linux_binprm", "filename")?,
            file_inode: self.offset("file", "f_inode")?,
            file_dentry: self.offset("file", "f_path.dentry")?,
            inode_ino: self.offset("inode", "i_ino")?,
            inode_sb: self.offset("inode", "i_sb")?,
            sb_dev: self.offset("super_block", "s_dev")?,
            dentry_parent: self.offset("dentry", "d_parent")?,
            dentry_inode: self.offset("dentry", "d_inode")?,
            task_pid: self.offset("task_struct", "pid")?,
            task_tgid: self.offset("task_struct", "tgid")?,
            task_mm: self.offset("task_struct", "mm")?,
            mm_arg_start: self.offset("mm_struct", "arg_start")?,
            mm_arg_end: self.offset("mm_struct", "arg_end")?,
            _pad: 0,
        })
    }
}

impl KernelBtf {
    /// The offsets that lead from a socket to its cgroup's ancestors' ids
    /// ([`SockCgroupConfig`], see `agent-ebpf/src/scope.rs`).
    pub fn sock_cgroup_config(&self) -> Result<SockCgroupConfig, BtfError> {
        self.check_pointers(&[("sock_cgroup_data", "cgroup"), ("cgroup", "kn")])?;
        Ok(SockCgroupConfig {
            valid: SOCK_CGROUP_CONFIG_VALID,
            sk_cgroup: self.offset("sock", "sk_cgrp_data.cgroup")?,
            cgroup_level: self.offset("cgroup", "level")?,
            // A flexible array of `struct cgroup *` (kernel 6.0+).
            cgroup_ancestors: self.offset("cgroup", "ancestors")?,
            cgroup_kn: self.offset("cgroup", "kn")?,
            kn_id: self.offset("kernfs_node", "id")?,
        })
    }

    /// The offsets of [`ScriptConfig`]; `fput_fn` is the address of `____fput`
    /// ([`kernel_symbol`]).
    pub fn script_config(&self, fput_fn: u64) -> Result<ScriptConfig, BtfError> {
        for (s, m) in [
            ("linux_binprm", "interp"),
            ("linux_binprm", "filename"),
            ("linux_binprm", "executable"),
            ("task_struct", "task_works"),
            ("callback_head", "next"),
            ("callback_head", "func"),
        ] {
            if !self.is_ptr_member(s, m) {
                return Err(BtfError::NoMember {
                    strukt: s.into(),
                    member: format!("{m} (as a pointer)"),
                });
            }
        }
        Ok(ScriptConfig {
            valid: SCRIPT_CONFIG_VALID,
            bprm_interp: self.offset("linux_binprm", "interp")?,
            bprm_executable: self.offset("linux_binprm", "executable")?,
            task_works: self.offset("task_struct", "task_works")?,
            file_task_work: self.offset("file", "f_task_work")?,
            file_flags: self.offset("file", "f_flags")?,
            cb_next: self.offset("callback_head", "next")?,
            cb_func: self.offset("callback_head", "func")?,
            fput_fn,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-built BTF blob: `struct inner { int a; int b; }`,
    /// `struct outer { int x; union { int y; struct inner in; }; struct inner *p; }`.
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0a\0b\0inner\0outer\0x\0y\0in\0p\0";
        let s = |name: &str| -> u32 {
            let pat = [name.as_bytes(), b"\0"].concat();
            let i = strings
                .windows(pat.len())
                .enumerate()
                .find(|(i, w)| *w == pat.as_slice() && strings[i - 1] == 0)
                .map(|(i, _)| i)
                .expect("string present");
            u32::try_from(i).expect("small")
        };
        let mut t = Vec::new();
        let mut push = |words: &[u32]| {
            for w in words {
                t.extend_from_slice(&w.to_le_bytes());
            }
        };
        // 1: int
        push(&[s("int"), KIND_INT << 24, 4, 32]);
        // 2: struct inner { a @0, b @32 bits }
        push(&[s("inner"), (KIND_STRUCT << 24) | 2, 8]);
        push(&[s("a"), 1, 0]);
        push(&[s("b"), 1, 32]);
        // 3: anonymous union { y, in }
        push(&[0, (KIND_UNION << 24) | 2, 8]);
        push(&[s("y"), 1, 0]);
        push(&[s("in"), 2, 0]);
        // 4: ptr -> 2
        push(&[0, KIND_PTR << 24, 2]);
        // 5: struct outer { x @0, <anon> @64, p @128 }
        push(&[s("outer"), (KIND_STRUCT << 24) | 3, 24]);
        push(&[s("x"), 1, 0]);
        push(&[0, 3, 64]);
        push(&[s("p"), 4, 128]);
        let mut b = Vec::new();
        b.extend_from_slice(&[0x9f, 0xeb, 1, 0]);
        for w in [
            24u32,
            0,
            u32::try_from(t.len()).expect("small"),
            u32::try_from(t.len()).expect("small"),
            u32::try_from(strings.len()).expect("small"),
        ] {
            b.extend_from_slice(&w.to_le_bytes());
        }
        b.extend_from_slice(&t);
        b.extend_from_slice(strings);
        b
    }

    #[test]
    fn offsets_through_anonymous_members_and_nested_paths() {
        let btf = KernelBtf::parse(&blob()).expect("parse");
        assert_eq!(btf.offset("outer", "x").expect("x"), 0);
        assert_eq!(btf.offset("outer", "y").expect("y"), 8);
        assert_eq!(btf.offset("outer", "in.b").expect("in.b"), 12);
        assert_eq!(btf.offset("outer", "p").expect("p"), 16);
        assert!(btf.is_ptr_member("outer", "p"));
        assert!(!btf.is_ptr_member("outer", "x"));
        assert!(matches!(
            btf.offset("outer", "nope"),
            Err(BtfError::NoMember { .. })
        ));
        assert!(matches!(
            btf.offset("absent", "x"),
            Err(BtfError::NoStruct(_))
        ));
    }

    #[test]
    fn symbol_address_takes_core_text_symbols_only() {
        let text = "ffffffff816bd830 t __fput\nffffffff816bdb40 t ____fput\n\
                    ffffffffc0001000 t ____fput\t[some_mod]\n0000000000000000 T hidden\n";
        assert_eq!(
            symbol_address(text, "____fput"),
            Some(0xffff_ffff_816b_db40)
        );
        assert_eq!(symbol_address(text, "__fput"), Some(0xffff_ffff_816b_d830));
        assert_eq!(symbol_address(text, "hidden"), None);
        assert_eq!(symbol_address(text, "absent"), None);
    }

    #[test]
    fn rejects_non_btf() {
        assert!(KernelBtf::parse(b"\x7fELF....").is_err());
    }

    /// The socket-to-cgroup offsets resolve on a kernel with BTF, and are distinct fields.
    #[test]
    fn kernel_btf_has_the_socket_cgroup_offsets() {
        if !Path::new(VMLINUX_BTF).exists() {
            println!("SKIP: no {VMLINUX_BTF} on this kernel");
            return;
        }
        let btf = KernelBtf::from_sys_fs().expect("read vmlinux BTF");
        let c = btf.sock_cgroup_config().expect("socket cgroup offsets");
        assert_eq!(c.valid, SOCK_CGROUP_CONFIG_VALID);
        assert!(c.sk_cgroup > 0 && c.kn_id > 0);
        assert!(
            c.cgroup_ancestors > c.cgroup_level && c.cgroup_ancestors > c.cgroup_kn,
            "ancestors[] is the flexible array at the end of struct cgroup: {c:?}"
        );
        assert_eq!(c.cgroup_ancestors % 8, 0, "an array of pointers");
    }

    /// On a kernel that publishes BTF, the exec offsets resolve (unprivileged: the file is
    /// world-readable). Kernels without BTF cannot run the exec programs at all.
    #[test]
    fn kernel_btf_has_every_exec_offset() {
        if !Path::new(VMLINUX_BTF).exists() {
            println!("SKIP: no {VMLINUX_BTF} on this kernel");
            return;
        }
        let btf = KernelBtf::from_sys_fs().expect("read vmlinux BTF");
        let c = btf.exec_config().expect("exec offsets");
        assert_eq!(c.valid, EXEC_CONFIG_VALID);
        assert!(c.bprm_file > 0 && c.file_inode > 0 && c.dentry_parent > 0);
        assert_ne!(c.task_pid, c.task_tgid);
        assert_eq!(
            c.mm_arg_end,
            c.mm_arg_start + 8,
            "arg_end follows arg_start"
        );
        // The script lookup's offsets (the `____fput` address needs root: a stand-in here).
        let sc = btf.script_config(1).expect("script offsets");
        assert_eq!(sc.valid, SCRIPT_CONFIG_VALID);
        assert_ne!(sc.bprm_interp, c.bprm_filename);
        assert_eq!(sc.cb_next, 0, "callback_head.next is the first member");
        assert_eq!(sc.cb_func, 8);
    }
}
