//! Start-up checks: the agent's flags and its environment are checked before anything is
//! served, and the first problem stops the agent with one line naming it (main.rs prints it,
//! exit code 2), instead of an agent that starts and then fails every call, or retries a
//! registration the control plane can never accept.
//!
//! Order, cheapest first: flags ([`check_flags`], pure; [`check_tls_files`] reads the TLS
//! files), the data directory ([`check_data_dir`]), the external programs ([`check_tools`]),
//! then libvirt ([`connect_libvirt`], with a bounded wait because libvirtd may be starting).
//!
//! Each rule is a plain function over small inputs ([`normalize_advertise`], [`check_token`],
//! [`check_control_plane`], [`check_path_traversable`], ...), unit-tested below; the functions
//! that touch the file system, run programs or connect are thin edges over them.
//!
//! There is no fake-hypervisor mode in the binary (in-process tests build the service and call
//! [`crate::server::serve`] directly, which runs none of this), so the libvirt and QEMU tool
//! checks always run.

use std::error::Error as StdError;
use std::ffi::OsStr;
use std::fmt;
use std::fs;
use std::io;
use std::net::{AddrParseError, IpAddr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio::process::Command;

use crate::config::AgentArgs;
use crate::config::TlsFiles;
use crate::hypervisor::{HypervisorError, LibvirtHypervisor};
use crate::images::SourcePolicy;
use crate::paths::{DataDir, PathsError};

/// The shortest agent token either side accepts (why: [`proto::bearer::MIN_TOKEN_BYTES`]).
pub use proto::bearer::MIN_TOKEN_BYTES;

/// How long start-up waits for libvirt to answer: libvirtd may be starting alongside the agent
/// (systemd starts both at boot), but a daemon that stays down must fail the start, not hang it.
pub const LIBVIRT_WAIT: Duration = Duration::from_secs(10);

/// Wall-clock limit of one `<tool> --version` run at start-up.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest `--advertise` value: the control plane refuses longer addresses.
const MAX_ADDRESS_LEN: usize = 255;

/// An external program the agent runs, checked at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tool {
    /// The program, looked up in `PATH`.
    pub program: &'static str,
    /// Arguments of a harmless run that proves it starts (`--version`).
    pub args: &'static [&'static str],
    /// The Debian package that provides it, for the error line.
    pub package: &'static str,
}

/// Every program the agent runs: `qemu-img` (disks.rs) under `prlimit` (its resource limits),
/// and `genisoimage` (seed.rs, the NoCloud ISO).
pub const TOOLS: [Tool; 3] = [
    Tool {
        program: "qemu-img",
        args: &["--version"],
        package: "qemu-utils",
    },
    Tool {
        program: "prlimit",
        args: &["--version"],
        package: "util-linux",
    },
    Tool {
        program: "genisoimage",
        args: &["--version"],
        package: "genisoimage",
    },
];

/// Why the agent refuses to start. Each variant names the check that failed; the cause, when
/// there is one, is the source (never repeated in the message; [`error_line`] joins them).
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    /// `--listen` is not a socket address.
    #[error("--listen {value:?} is not IP:PORT")]
    Listen {
        /// The flag's value.
        value: String,
        /// Why it does not parse.
        #[source]
        source: AddrParseError,
    },
    /// `--advertise` is not an address the control plane can dial.
    #[error("--advertise {value:?}")]
    Advertise {
        /// The flag's value.
        value: String,
        /// What is wrong with it.
        #[source]
        source: AddressError,
    },
    /// Registering without `--advertise` would send a wildcard address nobody can dial.
    #[error(
        "--advertise is required with --control-plane when --listen ({listen}) is a wildcard \
         address: the control plane cannot dial it"
    )]
    AdvertiseRequired {
        /// The listen address.
        listen: SocketAddr,
    },
    /// `--control-plane` is not an http(s) URL with a host.
    #[error("--control-plane {value:?}")]
    ControlPlane {
        /// The flag's value.
        value: String,
        /// What is wrong with it.
        #[source]
        source: UrlError,
    },
    /// An `--image-dir` cannot serve.
    #[error("--image-dir (SKYGATE_AGENT_IMAGE_DIRS)")]
    ImageDir(#[source] crate::images::ImageDirError),
    /// The agent token is missing or too weak.
    #[error("--agent-token (SKYGATE_AGENT_TOKEN)")]
    Token(#[source] TokenError),
    /// The host name the agent registers under would be refused by the control plane.
    #[error("host name {value:?} (--name, else the system's host name)")]
    Name {
        /// The name.
        value: String,
        /// What is wrong with it.
        #[source]
        source: NameError,
    },
    /// An empty domain prefix would make every libvirt domain the agent's.
    #[error("--domain-prefix is empty: the agent would own every libvirt domain")]
    EmptyDomainPrefix,
    /// One TLS file flag without its partner.
    #[error("{given} is given without {missing}")]
    TlsIncomplete {
        /// The flag given.
        given: &'static str,
        /// The flag it needs.
        missing: &'static str,
    },
    /// A TLS file cannot be read.
    #[error("{flag} {}: cannot read it", path.display())]
    TlsFile {
        /// The flag.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The data directory is unusable.
    #[error("data directory {}", path.display())]
    DataDir {
        /// `--data-dir`.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: DataDirError,
    },
    /// A program the agent runs is missing or broken.
    #[error("{program} (Debian package {package})")]
    Tool {
        /// The program.
        program: String,
        /// Where it comes from.
        package: &'static str,
        /// What went wrong running it.
        #[source]
        source: ToolError,
    },
    /// libvirt did not answer within the start-up wait.
    #[error("libvirt at {uri} is not reachable (tried for {waited:.1?})")]
    Libvirt {
        /// `--libvirt-uri`.
        uri: String,
        /// How long start-up tried.
        waited: Duration,
        /// The last attempt's error.
        #[source]
        source: HypervisorError,
    },
}

/// What is wrong with an `--advertise` value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// Nothing given.
    #[error("is empty")]
    Empty,
    /// Spaces or control characters.
    #[error("contains whitespace or control characters")]
    Whitespace,
    /// A URL whose scheme is not http or https.
    #[error("scheme {0:?} is not http or https; give host:port")]
    Scheme(String),
    /// A path, query or fragment after the address.
    #[error("has a path; give host:port (or http://host:port) only")]
    Path,
    /// `user@host`.
    #[error("has credentials (user@); give host:port")]
    UserInfo,
    /// No `:port`.
    #[error("has no port; give host:port")]
    MissingPort,
    /// The port is not 1-65535.
    #[error("port {0:?} is not a number from 1 to 65535")]
    BadPort(String),
    /// Nothing before `:port`.
    #[error("has no host; give host:port")]
    EmptyHost,
    /// The host is neither a DNS name nor an IP address.
    #[error("host {0:?} is not a DNS name or an IP address")]
    BadHost(String),
    /// An IPv6 address without brackets (its colons make the port ambiguous).
    #[error("an IPv6 address needs brackets: [ADDRESS]:PORT")]
    UnbracketedIpv6,
    /// 0.0.0.0 or [::]: a listen address, not one anybody can dial.
    #[error("{0} is a wildcard address the control plane cannot dial")]
    Unspecified(IpAddr),
    /// Longer than the control plane accepts.
    #[error("is longer than {MAX_ADDRESS_LEN} bytes")]
    TooLong,
}

/// What is wrong with a `--control-plane` value.
#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    /// Not a URL at all.
    #[error("is not a URL; expected http://HOST:PORT")]
    Invalid(#[source] tonic::codegen::http::uri::InvalidUri),
    /// No `http://` or `https://`.
    #[error("has no scheme; expected http://HOST:PORT or https://HOST:PORT")]
    NoScheme,
    /// Another scheme.
    #[error("scheme {0:?} is not http or https")]
    Scheme(String),
    /// No host.
    #[error("has no host")]
    NoHost,
    /// A port that is not 1-65535.
    #[error("port {0:?} is not a number from 1 to 65535")]
    BadPort(String),
    /// Credentials in the URL.
    #[error("has credentials (user@); the agent token authenticates")]
    UserInfo,
    /// A path, query or fragment (gRPC calls go to `/<package>.<Service>/<Method>` at the root).
    #[error("has a path or query; gRPC needs the bare http(s)://HOST:PORT")]
    Path,
    /// tonic's endpoint parser refuses it.
    #[error("is not a usable gRPC endpoint")]
    Endpoint(#[source] tonic::transport::Error),
}

/// What is wrong with the agent token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Neither the flag nor the variable is set.
    #[error("is not set")]
    Missing,
    /// Set to the empty string (`SKYGATE_AGENT_TOKEN=` in an environment file, too).
    #[error("is empty")]
    Empty,
    /// Spaces, control characters or non-ASCII: it could not travel in a gRPC header as is.
    #[error("must be visible ASCII without spaces (a trailing newline from a token file?)")]
    NotVisibleAscii,
    /// Too short to resist guessing.
    #[error("is {len} bytes; at least {MIN_TOKEN_BYTES} are required (e.g. head -c 32 /dev/urandom | base64)")]
    TooShort {
        /// Its length.
        len: usize,
    },
}

/// What is wrong with the host name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The control plane's rule (agents/registry.rs `valid_name`), checked here so a bad name
    /// fails the start instead of every registration attempt.
    #[error("must be 1-63 letters, digits, '.', '_' or '-'")]
    Invalid,
}

/// What is wrong with the data directory.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    /// Relative paths end up in domain XML and qcow2 backing files, resolved elsewhere.
    #[error("is not an absolute path")]
    Relative,
    /// Something on the path is a file, not a directory.
    #[error("{} is not a directory", .0.display())]
    NotADirectory(PathBuf),
    /// A directory QEMU (user `libvirt-qemu`) cannot traverse, so it could not open any disk,
    /// seed or kernel below it (HOST-NOTES.md).
    #[error(
        "{} (mode {mode:04o}) is not traversable by other users (o+x): QEMU runs as \
         libvirt-qemu and could not open the disks below it",
        dir.display()
    )]
    NotTraversable {
        /// The directory.
        dir: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A directory on the path could not be inspected.
    #[error("cannot inspect {}", dir.display())]
    Inspect {
        /// The directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Creating the layout (root, images/, machines/) failed; paths.rs's message names the
    /// directory and the cause.
    #[error(transparent)]
    Prepare(PathsError),
    /// The agent cannot create files in it.
    #[error("{} is not writable by the agent", dir.display())]
    NotWritable {
        /// The directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// What went wrong running a tool.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// Not in `PATH` (or not at the given path).
    #[error("not found in PATH")]
    NotFound,
    /// It exists but cannot be started (permissions, bad interpreter).
    #[error("cannot be started")]
    Spawn(#[source] io::Error),
    /// It ran and failed.
    #[error("`{args}` failed ({status}){}", first_line(stderr))]
    Failed {
        /// Its arguments.
        args: String,
        /// Its exit status.
        status: ExitStatus,
        /// What it printed on stderr.
        stderr: String,
    },
    /// It did not finish in time.
    #[error("`{args}` did not finish within {timeout:?}")]
    Timeout {
        /// Its arguments.
        args: String,
        /// The limit.
        timeout: Duration,
    },
}

/// `: <first non-empty line>` of a program's stderr, or nothing.
fn first_line(stderr: &str) -> String {
    stderr
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(|l| format!(": {l}"))
        .unwrap_or_default()
}

/// The flags after checking, in the form the agent uses them.
#[derive(Clone)]
pub struct Flags {
    /// Where to listen.
    pub listen: SocketAddr,
    /// `host:port` to register, normalised from `--advertise` (None: the bound address).
    pub advertise: Option<String>,
    /// The control plane's gRPC URL, when registering.
    pub control_plane: Option<String>,
    /// The shared agent token.
    pub token: String,
    /// The host name to report.
    pub name: String,
    /// TLS files, when serving TLS.
    pub tls: Option<TlsFiles>,
}

impl fmt::Debug for Flags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Flags")
            .field("listen", &self.listen)
            .field("advertise", &self.advertise)
            .field("control_plane", &self.control_plane)
            .field("token", &"<redacted>")
            .field("name", &self.name)
            .field("tls", &self.tls)
            .finish()
    }
}

/// Checks every flag that can be checked without the environment; `system_name` is the host
/// name used when `--name` is absent. Pure: no file, network or process is touched.
pub fn check_flags(args: &AgentArgs, system_name: &str) -> Result<Flags, PreflightError> {
    let listen: SocketAddr = args
        .listen
        .parse()
        .map_err(|source| PreflightError::Listen {
            value: args.listen.clone(),
            source,
        })?;
    let advertise = args
        .advertise
        .as_deref()
        .map(|value| {
            normalize_advertise(value).map_err(|source| PreflightError::Advertise {
                value: value.to_owned(),
                source,
            })
        })
        .transpose()?;
    let control_plane = args
        .control_plane
        .as_deref()
        .map(|value| {
            check_control_plane(value).map_err(|source| PreflightError::ControlPlane {
                value: value.to_owned(),
                source,
            })
        })
        .transpose()?;
    let token = check_token(args.agent_token.as_deref()).map_err(PreflightError::Token)?;
    if args.domain_prefix.is_empty() {
        return Err(PreflightError::EmptyDomainPrefix);
    }
    let name = args.name.clone().unwrap_or_else(|| system_name.to_owned());
    if control_plane.is_some() {
        if advertise.is_none() && listen.ip().is_unspecified() {
            return Err(PreflightError::AdvertiseRequired { listen });
        }
        check_name(&name).map_err(|source| PreflightError::Name {
            value: name.clone(),
            source,
        })?;
    }
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: args.tls_client_ca.clone(),
        }),
        (Some(_), None) => return Err(tls_incomplete("--tls-cert", "--tls-key")),
        (None, Some(_)) => return Err(tls_incomplete("--tls-key", "--tls-cert")),
        (None, None) if args.tls_client_ca.is_some() => {
            return Err(tls_incomplete("--tls-client-ca", "--tls-cert"))
        }
        (None, None) => None,
    };
    Ok(Flags {
        listen,
        advertise,
        control_plane,
        token,
        name,
        tls,
    })
}

fn tls_incomplete(given: &'static str, missing: &'static str) -> PreflightError {
    PreflightError::TlsIncomplete { given, missing }
}

/// `--advertise` as the `host:port` the control plane stores: `host:port` as given, or the URL
/// form `http://host:port` / `https://host:port` (a trailing `/` allowed) reduced to it.
pub fn normalize_advertise(value: &str) -> Result<String, AddressError> {
    if value.is_empty() {
        return Err(AddressError::Empty);
    }
    if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(AddressError::Whitespace);
    }
    let address = match value.split_once("://") {
        Some((scheme, rest)) => {
            if !(scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https")) {
                return Err(AddressError::Scheme(scheme.to_owned()));
            }
            // `http://host:port/` is how URLs are often written; anything more is a path.
            rest.strip_suffix('/').unwrap_or(rest)
        }
        None => value,
    };
    if address.contains(['/', '?', '#']) {
        return Err(AddressError::Path);
    }
    if address.contains('@') {
        return Err(AddressError::UserInfo);
    }
    let (host, port) = split_host_port(address)?;
    let normalized = format!("{host}:{port}");
    if normalized.len() > MAX_ADDRESS_LEN {
        return Err(AddressError::TooLong);
    }
    Ok(normalized)
}

/// Splits `host:port` / `[v6]:port` and checks both halves.
fn split_host_port(address: &str) -> Result<(&str, u16), AddressError> {
    let (host, port) = if let Some(bracketed) = address.strip_prefix('[') {
        let (v6, rest) = bracketed
            .split_once(']')
            .ok_or_else(|| AddressError::BadHost(address.to_owned()))?;
        let ip: Ipv6Addr = v6
            .parse()
            .map_err(|_| AddressError::BadHost(format!("[{v6}]")))?;
        if ip.is_unspecified() {
            return Err(AddressError::Unspecified(IpAddr::V6(ip)));
        }
        let port = rest.strip_prefix(':').ok_or(AddressError::MissingPort)?;
        (&address[..v6.len() + 2], port)
    } else {
        let (host, port) = address.rsplit_once(':').ok_or(AddressError::MissingPort)?;
        if host.contains(':') {
            return Err(AddressError::UnbracketedIpv6);
        }
        if host.is_empty() {
            return Err(AddressError::EmptyHost);
        }
        let name_like = host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
        if !name_like || host.starts_with(['.', '-']) {
            return Err(AddressError::BadHost(host.to_owned()));
        }
        if let Ok(ip) = host.parse::<IpAddr>() {
            if ip.is_unspecified() {
                return Err(AddressError::Unspecified(ip));
            }
        }
        (host, port)
    };
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|p| *p > 0 && port.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| AddressError::BadPort(port.to_owned()))?;
    Ok((host, port))
}

/// `--control-plane` must be `http(s)://HOST[:PORT]` (a trailing `/` allowed), parseable by
/// tonic the way registration.rs will use it. Returns it unchanged.
pub fn check_control_plane(value: &str) -> Result<String, UrlError> {
    use tonic::codegen::http::Uri;
    let uri: Uri = value.parse().map_err(UrlError::Invalid)?;
    let scheme = uri.scheme_str().ok_or(UrlError::NoScheme)?;
    if !(scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https")) {
        return Err(UrlError::Scheme(scheme.to_owned()));
    }
    let authority = uri.authority().ok_or(UrlError::NoHost)?;
    if authority.as_str().contains('@') {
        return Err(UrlError::UserInfo);
    }
    if authority.host().is_empty() {
        return Err(UrlError::NoHost);
    }
    // `Uri` keeps a non-numeric port without complaint (and tonic too, until it dials).
    let port = authority
        .as_str()
        .strip_prefix(authority.host())
        .and_then(|rest| rest.strip_prefix(':'));
    if let Some(port) = port {
        if !port.bytes().all(|b| b.is_ascii_digit()) || !port.parse::<u16>().is_ok_and(|p| p > 0) {
            return Err(UrlError::BadPort(port.to_owned()));
        }
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(UrlError::Path);
    }
    tonic::transport::Endpoint::from_shared(value.to_owned()).map_err(UrlError::Endpoint)?;
    Ok(value.to_owned())
}

/// The agent token: set, visible ASCII (it travels as `authorization: Bearer <token>`), and at
/// least [`MIN_TOKEN_BYTES`] long.
pub fn check_token(token: Option<&str>) -> Result<String, TokenError> {
    let token = token.ok_or(TokenError::Missing)?;
    if token.is_empty() {
        return Err(TokenError::Empty);
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(TokenError::NotVisibleAscii);
    }
    if token.len() < MIN_TOKEN_BYTES {
        return Err(TokenError::TooShort { len: token.len() });
    }
    Ok(token.to_owned())
}

/// The host name under the control plane's rule (1-63 of letters, digits, `.`, `_`, `-`).
pub fn check_name(name: &str) -> Result<(), NameError> {
    let ok = (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(NameError::Invalid)
    }
}

/// Reads every TLS file given, so a missing or unreadable one fails the start.
pub fn check_tls_files(tls: &TlsFiles) -> Result<(), PreflightError> {
    let files = [
        ("--tls-cert", Some(&tls.cert)),
        ("--tls-key", Some(&tls.key)),
    ]
    .into_iter()
    .chain([("--tls-client-ca", tls.client_ca.as_ref())]);
    for (flag, path) in files {
        let Some(path) = path else { continue };
        fs::read(path).map_err(|source| PreflightError::TlsFile {
            flag,
            path: path.clone(),
            source,
        })?;
    }
    Ok(())
}

/// What a path component is, as far as the traversal rule cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathEntry {
    /// It does not exist yet (the agent creates it 0755).
    Missing,
    /// A directory with these permission bits.
    Dir {
        /// `st_mode & 0o7777`.
        mode: u32,
    },
    /// Something else (a file, a socket...).
    NotDir,
}

/// The rule over the data directory's path: `entries` are the directories on it (ancestors of
/// the root, through symlinks too), `root` the data directory itself. Every existing ancestor
/// must be a directory others can traverse (`o+x`); the root, when it exists, must be a
/// directory (its mode is set to 0755 by [`DataDir::prepare`]).
///
/// Group bits are not accepted instead of `o+x`: which user and group QEMU runs as is set in
/// libvirt's qemu.conf, which the agent does not read, and [`DataDir::prepare`] insists on
/// `o+x` anyway (a group-traversable path would pass here and fail there).
pub fn check_path_traversable(
    root: (&Path, PathEntry),
    ancestors: &[(PathBuf, PathEntry)],
) -> Result<(), DataDirError> {
    if root.1 == PathEntry::NotDir {
        return Err(DataDirError::NotADirectory(root.0.to_path_buf()));
    }
    for (dir, entry) in ancestors {
        match *entry {
            PathEntry::Missing => {}
            PathEntry::NotDir => return Err(DataDirError::NotADirectory(dir.clone())),
            PathEntry::Dir { mode } if mode & 0o001 == 0 => {
                return Err(DataDirError::NotTraversable {
                    dir: dir.clone(),
                    mode,
                })
            }
            PathEntry::Dir { .. } => {}
        }
    }
    Ok(())
}

/// The data directory exists or can be created, every directory on its path is traversable by
/// QEMU, and the agent can write in it; returns it prepared (root, images/, machines/).
pub fn check_data_dir(root: &Path) -> Result<DataDir, PreflightError> {
    let fail = |source| PreflightError::DataDir {
        path: root.to_path_buf(),
        source,
    };
    let data = DataDir::new(root).map_err(|_| fail(DataDirError::Relative))?;
    // Before creating anything, so a bad parent leaves nothing behind; and again after, for
    // parents just created under a narrow umask (only the root gets an explicit chmod).
    survey_and_check(root).map_err(fail)?;
    data.prepare().map_err(|e| fail(DataDirError::Prepare(e)))?;
    check_data_dir_usable(root)?;
    Ok(data)
}

/// The image source policy of `--image-dir`: each directory must exist; it is kept in its
/// canonical form, which the sources' canonical paths are compared with.
pub fn check_image_dirs(dirs: &[PathBuf]) -> Result<SourcePolicy, PreflightError> {
    SourcePolicy::with_file_dirs(dirs).map_err(PreflightError::ImageDir)
}

/// What [`check_data_dir`] checks, without creating or repairing anything: the agent's running
/// data dir is still traversable and writable. (The probe files are removed when dropped.)
pub fn check_data_dir_usable(root: &Path) -> Result<(), PreflightError> {
    let fail = |source| PreflightError::DataDir {
        path: root.to_path_buf(),
        source,
    };
    let data = DataDir::new(root).map_err(|_| fail(DataDirError::Relative))?;
    survey_and_check(root).map_err(fail)?;
    for dir in [root.to_path_buf(), data.images_dir(), data.machines_dir()] {
        tempfile::Builder::new()
            .prefix(".skygate-preflight-")
            .tempfile_in(&dir)
            .map_err(|source| fail(DataDirError::NotWritable { dir, source }))?;
    }
    Ok(())
}

fn survey_and_check(root: &Path) -> Result<(), DataDirError> {
    let root_entry = path_entry(root)?;
    let mut dirs: Vec<PathBuf> = root.ancestors().skip(1).map(Path::to_path_buf).collect();
    // Through symlinks: QEMU resolves them, so the directories of the real path count too.
    if let Some(real) = resolve_existing(root) {
        for dir in real.ancestors().skip(1) {
            if !dirs.iter().any(|d| d == dir) {
                dirs.push(dir.to_path_buf());
            }
        }
    }
    let ancestors = dirs
        .into_iter()
        .map(|d| path_entry(&d).map(|e| (d, e)))
        .collect::<Result<Vec<_>, _>>()?;
    check_path_traversable((root, root_entry), &ancestors)
}

fn path_entry(path: &Path) -> Result<PathEntry, DataDirError> {
    match fs::metadata(path) {
        Ok(meta) if meta.is_dir() => Ok(PathEntry::Dir {
            mode: meta.permissions().mode() & 0o7777,
        }),
        Ok(_) => Ok(PathEntry::NotDir),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(PathEntry::Missing),
        // ENOTDIR: a file further up; that file is reported by its own entry.
        Err(e) if e.kind() == io::ErrorKind::NotADirectory => Ok(PathEntry::Missing),
        Err(source) => Err(DataDirError::Inspect {
            dir: path.to_path_buf(),
            source,
        }),
    }
}

/// `path` with its longest existing prefix resolved through symlinks.
fn resolve_existing(path: &Path) -> Option<PathBuf> {
    path.ancestors().find_map(|existing| {
        let real = fs::canonicalize(existing).ok()?;
        Some(real.join(path.strip_prefix(existing).ok()?))
    })
}

/// Runs every tool in [`TOOLS`] once (`--version`), bounded by [`TOOL_TIMEOUT`] each.
pub async fn check_tools(tools: &[Tool]) -> Result<(), PreflightError> {
    for tool in tools {
        check_tool(tool, OsStr::new(tool.program), TOOL_TIMEOUT).await?;
    }
    Ok(())
}

/// Runs `program` (the tool, or another path for it) with the tool's arguments; it must start,
/// exit 0 and finish within `timeout`.
pub async fn check_tool(
    tool: &Tool,
    program: &OsStr,
    timeout: Duration,
) -> Result<(), PreflightError> {
    let shown = program.to_string_lossy().into_owned();
    let fail = |source| PreflightError::Tool {
        program: shown.clone(),
        package: tool.package,
        source,
    };
    let args = tool.args.join(" ");
    let child = Command::new(program)
        .args(tool.args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            fail(if e.kind() == io::ErrorKind::NotFound {
                ToolError::NotFound
            } else {
                ToolError::Spawn(e)
            })
        })?;
    let output = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => return Err(fail(ToolError::Spawn(e))),
        Err(_) => return Err(fail(ToolError::Timeout { args, timeout })),
    };
    if output.status.success() {
        Ok(())
    } else {
        Err(fail(ToolError::Failed {
            args,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }))
    }
}

/// The start-up checks that can break while the agent runs (a tool removed or broken by a
/// package upgrade, the data dir made unwritable), run again before every heartbeat. Flags
/// and libvirt are not among them: flags do not change, and an unreachable libvirt already
/// fails every call with its own error.
#[derive(Debug, Clone)]
pub struct HostSelfCheck {
    data_dir: PathBuf,
}

impl HostSelfCheck {
    /// Checks [`TOOLS`] and the data dir at `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
        }
    }
}

#[async_trait::async_trait]
impl crate::registration::SelfCheck for HostSelfCheck {
    async fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for tool in &TOOLS {
            if let Err(e) = check_tool(tool, OsStr::new(tool.program), TOOL_TIMEOUT).await {
                problems.push(error_line(&e));
            }
        }
        let dir = self.data_dir.clone();
        match tokio::task::spawn_blocking(move || check_data_dir_usable(&dir)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => problems.push(error_line(&e)),
            Err(e) => problems.push(format!("the data dir check did not finish: {e}")),
        }
        problems
    }
}

/// Connects to libvirt at `uri`, trying again with growing pauses (0.5 s, 1 s, 2 s, ...) until
/// `wait` has passed; each attempt is bounded by what is left of `wait`, so a daemon that
/// accepts the connection but never answers cannot hang the start either.
pub async fn connect_libvirt(
    uri: &str,
    wait: Duration,
) -> Result<LibvirtHypervisor, PreflightError> {
    let started = Instant::now();
    let deadline = started + wait;
    let mut pause = Duration::from_millis(500);
    loop {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(100));
        let target = uri.to_owned();
        let attempt = tokio::time::timeout(
            left,
            tokio::task::spawn_blocking(move || LibvirtHypervisor::connect(&target)),
        )
        .await;
        let error = match attempt {
            Ok(Ok(Ok(hv))) => return Ok(hv),
            Ok(Ok(Err(e))) => e,
            Ok(Err(join)) => HypervisorError::Join(join.to_string()),
            Err(_) => HypervisorError::Unreachable("the connection attempt hung".into()),
        };
        if Instant::now() + pause >= deadline {
            return Err(PreflightError::Libvirt {
                uri: uri.to_owned(),
                waited: started.elapsed(),
                source: error,
            });
        }
        tracing::debug!(uri, error = %error, retry_in = ?pause, "libvirt not reachable yet");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(4));
    }
}

/// The one line printed when the agent cannot start or stops: the error and its sources joined
/// with ": " ([`crate::report::chain`]), line breaks inside messages (libvirt's, a tool's)
/// folded, so the result is always one line.
pub fn error_line(error: &(dyn StdError + 'static)) -> String {
    crate::report::chain(error)
        .split(['\n', '\r'])
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The one line for a command-line error from clap: its first paragraph without the
/// `error: ` prefix, lines joined (a missing required flag is named on the line after), the
/// usage and `--help` hints that follow dropped.
pub fn usage_error_line(error: &clap::Error) -> String {
    let rendered = error.render().to_string();
    let paragraph = rendered
        .trim_start()
        .split("\n\n")
        .next()
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    let line = paragraph.strip_prefix("error: ").unwrap_or(&paragraph);
    if line.is_empty() {
        "invalid command line".to_owned()
    } else {
        line.to_owned()
    }
}

#[cfg(test)]
mod tests;
