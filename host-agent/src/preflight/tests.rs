//! Unit tests of the start-up checks: the pure rules by table, the edges on temp dirs, small
//! shell commands and libvirt's built-in test driver.

use std::fs::Permissions;
use std::os::unix::fs::PermissionsExt;

use clap::Parser;

use super::*;
use crate::ports::parse_forward_ports;

const TOKEN: &str = "0123456789abcdef";

/// The agent's flags: `extra`, plus a good token unless `extra` gives one.
fn args(extra: &[&str]) -> AgentArgs {
    let mut argv = vec!["skygate-host-agent"];
    if !extra.contains(&"--agent-token") {
        argv.extend(["--agent-token", TOKEN]);
    }
    argv.extend_from_slice(extra);
    AgentArgs::try_parse_from(argv).unwrap()
}

fn flags(extra: &[&str]) -> Result<Flags, PreflightError> {
    check_flags(&args(extra), "hv-01")
}

/// A temp dir other users can traverse (tempfile makes 0700 ones), under /var/tmp: /tmp may
/// itself be fine, but the tests must not depend on it.
fn open_tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("skygate-preflight-")
        .permissions(Permissions::from_mode(0o755))
        .tempdir_in("/var/tmp")
        .unwrap()
}

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, Permissions::from_mode(mode)).unwrap();
}

#[test]
fn advertise_accepts_host_port_and_http_urls_normalised_to_host_port() {
    for (given, expected) in [
        ("127.0.0.1:9101", "127.0.0.1:9101"),
        ("http://127.0.0.1:9101", "127.0.0.1:9101"),
        ("https://127.0.0.1:9101", "127.0.0.1:9101"),
        ("http://127.0.0.1:9101/", "127.0.0.1:9101"),
        ("HTTP://hv-01.example:9091", "hv-01.example:9091"),
        ("hv-01.example:9091", "hv-01.example:9091"),
        ("localhost:1", "localhost:1"),
        ("[::1]:9091", "[::1]:9091"),
        ("http://[fd00::12]:65535", "[fd00::12]:65535"),
    ] {
        assert_eq!(
            normalize_advertise(given).as_deref(),
            Ok(expected),
            "{given}"
        );
    }
}

#[test]
fn advertise_refuses_what_the_control_plane_cannot_dial_naming_why() {
    use AddressError::*;
    for (given, expected) in [
        ("", Empty),
        ("ftp://x", Scheme("ftp".into())),
        ("grpc://h:1", Scheme("grpc".into())),
        ("http://h:1/agent", Path),
        ("h:1/", Path),
        ("http://h:1?x=1", Path),
        ("http://user@h:1", UserInfo),
        ("http://127.0.0.1", MissingPort),
        ("hv-01", MissingPort),
        ("[::1]", MissingPort),
        ("h:", BadPort("".into())),
        ("h:0", BadPort("0".into())),
        ("h:65536", BadPort("65536".into())),
        ("h:+80", BadPort("+80".into())),
        ("h:http", BadPort("http".into())),
        (":9091", EmptyHost),
        ("http://:9091", EmptyHost),
        ("::1:9091", UnbracketedIpv6),
        ("h_ö:1", BadHost("h_ö".into())),
        ("-h:1", BadHost("-h".into())),
        ("[nonsense]:1", BadHost("[nonsense]".into())),
        ("h 1:2", Whitespace),
        ("h:1\n", Whitespace),
        ("0.0.0.0:9091", Unspecified("0.0.0.0".parse().unwrap())),
        ("http://[::]:9091", Unspecified("::".parse().unwrap())),
    ] {
        assert_eq!(normalize_advertise(given), Err(expected), "{given:?}");
    }
    let long = format!("{}:1", "a".repeat(MAX_ADDRESS_LEN));
    assert_eq!(normalize_advertise(&long), Err(TooLong));
}

#[test]
fn control_plane_must_be_an_http_url_with_a_host() {
    for ok in [
        "http://127.0.0.1:9090",
        "https://cp.example:9090",
        "http://cp.example",
        "http://[::1]:9090/",
    ] {
        assert_eq!(check_control_plane(ok).unwrap(), ok);
    }
    for (bad, want) in [
        ("127.0.0.1:9090", "scheme"),
        ("cp.example", "scheme"),
        ("ftp://cp:9090", "\"ftp\""),
        ("http://cp:9090/api", "path"),
        ("http://cp:9090?x", "path"),
        ("http://u:p@cp:9090", "credentials"),
        ("http://:9090", "host"),
        ("http://cp:notaport", "port \"notaport\""),
        ("http://cp:0", "port \"0\""),
        ("http://[::1]:99999", "port \"99999\""),
        ("", "URL"),
    ] {
        let e = check_control_plane(bad).unwrap_err();
        assert!(e.to_string().contains(want), "{bad:?}: {e}");
    }
}

#[test]
fn token_must_be_set_visible_ascii_and_at_least_16_bytes() {
    assert_eq!(check_token(None), Err(TokenError::Missing));
    assert_eq!(check_token(Some("")), Err(TokenError::Empty));
    assert_eq!(
        check_token(Some("change-me")),
        Err(TokenError::TooShort { len: 9 })
    );
    assert_eq!(
        check_token(Some(&TOKEN[..15])),
        Err(TokenError::TooShort { len: 15 })
    );
    assert_eq!(check_token(Some(TOKEN)).as_deref(), Ok(TOKEN));
    for bad in [
        format!("{TOKEN}\n"),
        format!(" {TOKEN}"),
        format!("{TOKEN} more"),
        format!("{TOKEN}é"),
    ] {
        assert_eq!(
            check_token(Some(&bad)),
            Err(TokenError::NotVisibleAscii),
            "{bad:?}"
        );
    }
    // Whatever passes can travel as a header, both ways (proto::bearer).
    assert!(proto::bearer::BearerToken::new(TOKEN).is_ok());
}

#[test]
fn names_follow_the_control_planes_rule() {
    for ok in ["hv-01", "a", "hv_1.example", &"x".repeat(63)] {
        assert_eq!(check_name(ok), Ok(()), "{ok}");
    }
    for bad in ["", "a b", "hv/1", "hö", &"x".repeat(64)] {
        assert_eq!(check_name(bad), Err(NameError::Invalid), "{bad}");
    }
}

#[test]
fn forward_ports_must_be_a_sane_unprivileged_range() {
    assert!(parse_forward_ports("20000-29999").is_ok());
    assert!(parse_forward_ports("1024-1024").is_ok());
    for (bad, want) in [
        ("80-90", "privileged"),
        ("1023-2000", "privileged"),
        ("30000-20000", "above"),
        ("0-10", "between 1 and 65535"),
        ("2000", "FIRST-LAST"),
    ] {
        let e = parse_forward_ports(bad).unwrap_err();
        assert!(e.contains(want), "{bad}: {e}");
    }
    // Through clap, as the binary sees it: one line naming the flag.
    let e = AgentArgs::try_parse_from(["x", "--forward-ports", "22-80"]).unwrap_err();
    let line = usage_error_line(&e);
    assert!(
        line.contains("--forward-ports") && line.contains("privileged"),
        "{line}"
    );
    assert!(!line.contains('\n'));
}

#[test]
fn usage_errors_are_one_line_naming_the_flag() {
    let line = |argv: &[&str]| usage_error_line(&AgentArgs::try_parse_from(argv).unwrap_err());
    // The missing flags are on the lines after the first in clap's message.
    assert_eq!(
        line(&["x", "--tls-client-ca", "/ca.pem"]),
        "the following required arguments were not provided: --tls-key <TLS_KEY> \
         --tls-cert <TLS_CERT>"
    );
    assert_eq!(
        line(&["x", "--no-such-flag"]),
        "unexpected argument '--no-such-flag' found"
    );
    assert!(line(&["x", "--poll-interval-ms", "5"])
        .starts_with("invalid value '5' for '--poll-interval-ms"));
}

#[test]
fn check_flags_normalises_advertise_and_keeps_the_rest() {
    let f = flags(&[
        "--listen",
        "127.0.0.1:0",
        "--advertise",
        "http://127.0.0.1:9101",
        "--control-plane",
        "http://127.0.0.1:9090",
    ])
    .unwrap();
    assert_eq!(f.advertise.as_deref(), Some("127.0.0.1:9101"));
    assert_eq!(f.listen, "127.0.0.1:0".parse().unwrap());
    assert_eq!(f.control_plane.as_deref(), Some("http://127.0.0.1:9090"));
    assert_eq!(f.name, "hv-01");
    assert_eq!(f.token, TOKEN);
    assert!(f.tls.is_none());
    assert!(
        !format!("{f:?}").contains(TOKEN),
        "the token leaks in Debug"
    );
}

#[test]
fn check_flags_names_the_flag_that_is_wrong() {
    let line = |extra: &[&str]| error_line(&flags(extra).unwrap_err());
    assert_eq!(
        line(&["--advertise", "ftp://x"]),
        "--advertise \"ftp://x\": scheme \"ftp\" is not http or https; give host:port"
    );
    assert!(line(&["--listen", "localhost:9091"]).starts_with("--listen \"localhost:9091\""));
    assert!(line(&["--control-plane", "cp:9090"]).starts_with("--control-plane \"cp:9090\""));
    assert!(
        line(&["--agent-token", ""]).starts_with("--agent-token (SKYGATE_AGENT_TOKEN): is empty")
    );
    assert!(line(&["--domain-prefix", ""]).starts_with("--domain-prefix is empty"));
    // Registering a wildcard address would leave the control plane nothing to dial.
    assert!(matches!(
        flags(&[
            "--listen",
            "0.0.0.0:9091",
            "--control-plane",
            "http://cp:9090"
        ]),
        Err(PreflightError::AdvertiseRequired { .. })
    ));
    assert!(flags(&["--listen", "0.0.0.0:9091"]).is_ok());
    // A name the control plane would refuse fails now, not at every registration.
    assert!(matches!(
        flags(&["--name", "a b", "--control-plane", "http://cp:9090"]),
        Err(PreflightError::Name { .. })
    ));
    assert!(matches!(
        check_flags(
            &args(&["--control-plane", "http://cp:9090"]),
            "bad host name"
        ),
        Err(PreflightError::Name { .. })
    ));
}

#[test]
fn tls_files_must_come_in_pairs_and_be_readable() {
    // clap already ties --tls-cert and --tls-key together on the command line.
    assert!(AgentArgs::try_parse_from(["x", "--tls-cert", "/c"]).is_err());
    let mut a = args(&[]);
    a.tls_key = Some("/k".into());
    assert!(matches!(
        check_flags(&a, "h"),
        Err(PreflightError::TlsIncomplete {
            given: "--tls-key",
            ..
        })
    ));

    let tmp = open_tempdir();
    let cert = tmp.path().join("cert.pem");
    fs::write(&cert, "pem").unwrap();
    let f = flags(&[
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        "/nonexistent/key.pem",
    ])
    .unwrap();
    let e = check_tls_files(f.tls.as_ref().unwrap()).unwrap_err();
    assert_eq!(
        error_line(&e),
        "--tls-key /nonexistent/key.pem: cannot read it: No such file or directory (os error 2)"
    );
    let key = tmp.path().join("key.pem");
    fs::write(&key, "pem").unwrap();
    let f = flags(&[
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ])
    .unwrap();
    check_tls_files(f.tls.as_ref().unwrap()).unwrap();
}

#[test]
fn traversal_rule_names_the_first_closed_directory() {
    let root = Path::new("/a/b/agent");
    let dir = |p: &str, mode| (PathBuf::from(p), PathEntry::Dir { mode });
    let open = [dir("/a/b", 0o755), dir("/a", 0o711), dir("/", 0o755)];
    assert!(check_path_traversable((root, PathEntry::Missing), &open).is_ok());
    // The root's own mode does not matter: prepare() sets it to 0755.
    assert!(check_path_traversable((root, PathEntry::Dir { mode: 0o700 }), &open).is_ok());
    // Group and owner bits do not make up for a missing o+x.
    let closed = [dir("/a/b", 0o770), dir("/a", 0o700), dir("/", 0o755)];
    match check_path_traversable((root, PathEntry::Missing), &closed) {
        Err(DataDirError::NotTraversable { dir, mode }) => {
            assert_eq!((dir, mode), (PathBuf::from("/a/b"), 0o770));
        }
        other => panic!("{other:?}"),
    }
    // Missing ancestors will be created 0755.
    let missing = [
        (PathBuf::from("/a/b"), PathEntry::Missing),
        dir("/a", 0o751),
        dir("/", 0o755),
    ];
    assert!(check_path_traversable((root, PathEntry::Missing), &missing).is_ok());
    let file = [(PathBuf::from("/a/b"), PathEntry::NotDir)];
    assert!(matches!(
        check_path_traversable((root, PathEntry::Missing), &file),
        Err(DataDirError::NotADirectory(p)) if p == Path::new("/a/b")
    ));
    assert!(matches!(
        check_path_traversable((root, PathEntry::NotDir), &open),
        Err(DataDirError::NotADirectory(p)) if p == root
    ));
}

#[test]
fn data_dir_is_created_0755_and_writable_below_open_parents() {
    let tmp = open_tempdir();
    let root = tmp.path().join("deep").join("agent");
    let data = check_data_dir(&root).unwrap();
    assert_eq!(data.root(), root);
    for d in [root.clone(), data.images_dir(), data.machines_dir()] {
        assert_eq!(
            fs::metadata(&d).unwrap().permissions().mode() & 0o777,
            0o755,
            "{d:?}"
        );
        // The write probe leaves nothing behind.
        assert_eq!(
            fs::read_dir(&d)
                .unwrap()
                .filter(|e| e
                    .as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with(".skygate-preflight-"))
                .count(),
            0
        );
    }
    // Idempotent.
    check_data_dir(&root).unwrap();
}

#[test]
fn data_dir_below_a_0700_directory_is_refused_naming_it_and_nothing_is_created() {
    let tmp = open_tempdir();
    let private = tmp.path().join("private");
    fs::create_dir(&private).unwrap();
    chmod(&private, 0o700);
    let root = private.join("agent");
    let e = check_data_dir(&root).unwrap_err();
    assert_eq!(
        error_line(&e),
        format!(
            "data directory {}: {} (mode 0700) is not traversable by other users (o+x): QEMU \
             runs as libvirt-qemu and could not open the disks below it",
            root.display(),
            private.display()
        )
    );
    assert!(!root.exists());
}

#[test]
fn data_dir_reached_through_a_symlink_checks_the_real_path() {
    let tmp = open_tempdir();
    let private = tmp.path().join("private");
    fs::create_dir_all(private.join("real")).unwrap();
    chmod(&private, 0o700);
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(private.join("real"), &link).unwrap();
    match check_data_dir(&link.join("agent")) {
        Err(PreflightError::DataDir {
            source: DataDirError::NotTraversable { dir, mode: 0o700 },
            ..
        }) => assert_eq!(dir, fs::canonicalize(&private).unwrap()),
        other => panic!("{other:?}"),
    }
}

#[test]
fn data_dir_must_be_absolute_and_a_directory() {
    assert!(matches!(
        check_data_dir(Path::new("var/lib/agent")),
        Err(PreflightError::DataDir {
            source: DataDirError::Relative,
            ..
        })
    ));
    let tmp = open_tempdir();
    let file = tmp.path().join("file");
    fs::write(&file, "").unwrap();
    for root in [file.clone(), file.join("agent")] {
        match check_data_dir(&root) {
            Err(PreflightError::DataDir {
                source: DataDirError::NotADirectory(p),
                ..
            }) => assert_eq!(p, file),
            other => panic!("{root:?}: {other:?}"),
        }
    }
}

const FAKE: Tool = Tool {
    program: "fake-tool",
    args: &["--version"],
    package: "fake-package",
};

#[tokio::test]
async fn a_missing_tool_is_named_with_its_package() {
    let e = check_tool(&FAKE, OsStr::new("skygate-no-such-tool"), TOOL_TIMEOUT)
        .await
        .unwrap_err();
    assert_eq!(
        error_line(&e),
        "skygate-no-such-tool (Debian package fake-package): not found in PATH"
    );
    let e = check_tool(&FAKE, OsStr::new("/nonexistent/qemu-img"), TOOL_TIMEOUT)
        .await
        .unwrap_err();
    assert!(matches!(
        e,
        PreflightError::Tool {
            source: ToolError::NotFound,
            ..
        }
    ));
}

#[tokio::test]
async fn a_failing_or_hanging_tool_is_reported_within_the_limit() {
    let failing = Tool {
        args: &["-c", "echo 'broken install' >&2; echo more >&2; exit 3"],
        ..FAKE
    };
    let e = check_tool(&failing, OsStr::new("sh"), TOOL_TIMEOUT)
        .await
        .unwrap_err();
    let line = error_line(&e);
    assert!(
        line.starts_with("sh (Debian package fake-package): `-c echo")
            && line.ends_with("failed (exit status: 3): broken install"),
        "{line}"
    );

    let hanging = Tool {
        args: &["-c", "exec sleep 30"],
        ..FAKE
    };
    let started = Instant::now();
    let e = check_tool(&hanging, OsStr::new("sh"), Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(matches!(
        e,
        PreflightError::Tool {
            source: ToolError::Timeout { .. },
            ..
        }
    ));

    let fine = Tool {
        args: &["-c", "exit 0"],
        ..FAKE
    };
    check_tool(&fine, OsStr::new("sh"), TOOL_TIMEOUT)
        .await
        .unwrap();
}

#[tokio::test]
async fn libvirt_is_connected_or_the_start_fails_within_the_wait() {
    // libvirt's built-in test driver needs no daemon.
    connect_libvirt("test:///default", Duration::from_secs(5))
        .await
        .unwrap();

    let uri = "qemu+unix:///system?socket=/nonexistent/libvirt-sock";
    let started = Instant::now();
    let e = connect_libvirt(uri, Duration::from_secs(2))
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(4), "took {took:?}");
    // It did retry: the first pause alone is 0.5 s.
    assert!(took >= Duration::from_millis(500), "took {took:?}");
    let line = error_line(&e);
    assert!(
        line.starts_with(&format!("libvirt at {uri} is not reachable (tried for ")),
        "{line}"
    );
    assert!(line.contains("hypervisor unreachable"), "{line}");
}

#[test]
fn messages_never_repeat_their_source_and_the_line_is_one_line() {
    let errors: Vec<PreflightError> = vec![
        flags(&["--advertise", "ftp://x"]).unwrap_err(),
        flags(&["--listen", "nope"]).unwrap_err(),
        flags(&["--control-plane", "::"]).unwrap_err(),
        PreflightError::Token(TokenError::TooShort { len: 3 }),
        PreflightError::Libvirt {
            uri: "qemu:///system".into(),
            waited: Duration::from_secs(10),
            source: HypervisorError::Unreachable("Failed to connect\nsocket".into()),
        },
        PreflightError::Tool {
            program: "qemu-img".into(),
            package: "qemu-utils",
            source: ToolError::Spawn(io::Error::other("exec format error")),
        },
    ];
    for e in &errors {
        let own = e.to_string();
        let source = e.source().expect("a source").to_string();
        assert!(!own.contains(&source), "{own:?} repeats {source:?}");
        let line = error_line(e);
        assert!(!line.contains('\n'), "{line:?}");
        assert!(
            line.starts_with(&format!("{own}: {}", source.replace('\n', " "))),
            "{line:?}"
        );
    }
}

#[test]
fn error_line_writes_each_source_once() {
    // The agent's errors name their operation and leave the cause to the source; the line
    // has each text once either way.
    let inner = io::Error::other("disk full");
    let outer = PathsError::Io {
        path: "/d".into(),
        source: inner,
    };
    assert_eq!(
        error_line(&outer),
        "cannot prepare directory \"/d\": disk full"
    );
}

/// The heartbeat's self-check reports a data dir that became untraversable after start-up,
/// and nothing once it is fixed. (Its tool lines depend on this machine's packages; the
/// tools' own check is tested on the binary in tests/startup.rs.)
#[tokio::test]
async fn the_self_check_reports_a_data_dir_that_broke_and_forgets_it_once_fixed() {
    use crate::registration::SelfCheck;
    let tmp = open_tempdir();
    let parent = tmp.path().join("parent");
    let root = parent.join("agent");
    fs::create_dir_all(&parent).unwrap();
    // As the agent left it at start-up.
    check_data_dir(&root).unwrap();
    let check = HostSelfCheck::new(&root);
    let about_dir = |problems: Vec<String>| -> Vec<String> {
        problems
            .into_iter()
            .filter(|p| p.starts_with("data directory"))
            .collect()
    };
    assert_eq!(about_dir(check.problems().await), Vec::<String>::new());
    chmod(&parent, 0o700);
    let problems = about_dir(check.problems().await);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].contains("(mode 0700) is not traversable by other users"),
        "{problems:?}"
    );
    chmod(&parent, 0o755);
    assert_eq!(about_dir(check.problems().await), Vec::<String>::new());
}
