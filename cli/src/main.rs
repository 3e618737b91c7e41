//! `skygate`: the command-line client of the SkyGate API. Every failure is one line on
//! stderr (with the request id when the server gave one) and a non-zero exit status.

// Printing is what a command-line client is for.
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod host_keys;
mod output;
mod session;
mod ssh;

use std::io::{IsTerminal, Read, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};
use skygate_api_types::{
    AddSshKeyParams, CreateMachineParams, CreateTokenParams, DesiredState, ListMachinesQuery,
    ListUsersQuery, MachinePatch, MachineStatus, MachineView, PageQuery, QuotaParams,
    RebuildParams, RegisterImageParams, RegisterParams, ResizeParams, RestartPolicy, RoleName,
    TokenScope,
};
use skygate_client::MachineAction;

use host_keys::{KnownHosts, Pinned};
use output::{print_one, print_rows, Output};
use session::{fail, Api, CliError, CliResult};

/// SkyGate command-line client.
#[derive(Debug, Parser)]
#[command(name = "skygate", version, about)]
struct Cli {
    /// API base URL (default: the one you logged in to, else http://127.0.0.1:8080).
    #[arg(long, env = "SKYGATE_API", global = true)]
    api: Option<String>,
    /// How to print results.
    #[arg(long, short, value_enum, default_value = "table", global = true)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Log in and keep the session in the config dir (~/.config/skygate, mode 0600).
    Login {
        #[arg(long, short)]
        username: String,
        /// Read the password from standard input instead of prompting.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Create an account (then log in).
    Register {
        #[arg(long, short)]
        username: String,
        #[arg(long)]
        email: String,
        #[arg(long)]
        password_stdin: bool,
    },
    /// End the session (revokes its refresh tokens).
    Logout,
    /// Virtual machines.
    #[command(subcommand)]
    Machines(MachinesCmd),
    /// Saved SSH public keys.
    #[command(subcommand, name = "ssh-keys")]
    SshKeys(SshKeysCmd),
    /// Guest images.
    #[command(subcommand)]
    Images(ImagesCmd),
    /// Hypervisor hosts (administrators).
    #[command(subcommand)]
    Hosts(HostsCmd),
    /// Your account, its limits and what you hold against them.
    Profile,
    /// API tokens for scripts (use one with SKYGATE_TOKEN=sgt_...).
    #[command(subcommand)]
    Tokens(TokensCmd),
    /// The audit log, newest first (administrators: everyone's; otherwise your own).
    Audit {
        /// How many events, at most 200.
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// Accounts, their roles and limits (administrators).
    #[command(subcommand)]
    Users(UsersCmd),
}

#[derive(Debug, Subcommand)]
enum MachinesCmd {
    /// Ask for a new machine.
    Create {
        hostname: String,
        #[arg(long)]
        image: String,
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        #[arg(long, default_value_t = 512)]
        memory_mib: u64,
        #[arg(long, default_value_t = 10)]
        disk_gib: u64,
        /// An OpenSSH public key, a file holding one, or the name of a saved key (repeatable).
        #[arg(long = "ssh-key")]
        ssh_keys: Vec<String>,
        /// A cloud-init user-data file.
        #[arg(long)]
        user_data: Option<std::path::PathBuf>,
        /// What happens when its QEMU dies.
        #[arg(long, value_enum, default_value_t = PolicyArg::Never)]
        restart_policy: PolicyArg,
        /// A label, KEY=VALUE (repeatable).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Follow the machine until it runs.
        #[arg(long)]
        wait: bool,
    },
    /// Set or remove some of a machine's labels; the others stay.
    Label {
        machine: String,
        /// KEY=VALUE to set.
        #[arg(value_parser = parse_label)]
        set: Vec<(String, String)>,
        /// A key to remove (repeatable).
        #[arg(long)]
        remove: Vec<String>,
    },
    /// Wait until the machine reaches a status (or fails, or is deleted).
    Wait {
        machine: String,
        /// pending, provisioning, running, stopping, stopped, starting, rebooting, resizing,
        /// rebuilding, deleting, deleted or failed.
        #[arg(long, default_value = "running")]
        status: String,
        /// Give up after this many seconds (exit status 1).
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// Change a stopped machine's vCPUs, memory or disk (the disk only grows; the guest sees
    /// it at its next boot).
    Resize {
        machine: String,
        #[arg(long)]
        vcpus: Option<u32>,
        #[arg(long)]
        memory_mib: Option<u64>,
        #[arg(long)]
        disk_gib: Option<u64>,
        /// Follow the machine until it is stopped again.
        #[arg(long)]
        wait: bool,
    },
    /// Give the machine a fresh disk from its image (or --image): what its disk holds is
    /// erased. It keeps its id, hostname, size, address and SSH keys.
    Rebuild {
        machine: String,
        /// Another image to make the disk from.
        #[arg(long)]
        image: Option<String>,
        /// Confirm that the disk's contents may be erased.
        #[arg(long)]
        yes: bool,
        /// Follow the machine until it runs (or is stopped, if it was).
        #[arg(long)]
        wait: bool,
    },
    /// Set what happens when the machine's QEMU dies.
    SetRestartPolicy {
        machine: String,
        #[arg(value_enum)]
        policy: PolicyArg,
    },
    /// Your machines (all of them for administrators).
    List {
        #[arg(long)]
        status: Option<String>,
        /// Only machines with this label, KEY=VALUE.
        #[arg(long)]
        label: Option<String>,
    },
    /// One machine, by id or hostname.
    Show { machine: String },
    Start {
        machine: String,
        #[arg(long)]
        wait: bool,
    },
    Stop {
        machine: String,
        #[arg(long)]
        wait: bool,
    },
    Reboot {
        machine: String,
        #[arg(long)]
        wait: bool,
    },
    Delete {
        machine: String,
        #[arg(long)]
        wait: bool,
    },
    /// The machine's log.
    Events { machine: String },
    /// The tail of the machine's serial console.
    Console { machine: String },
    /// Run the system ssh against the machine's forwarded port (extra arguments after --).
    ///
    /// The machine's host keys are read from its console on first use and pinned in
    /// `known_hosts` in the config dir; ssh then checks them strictly, without prompting.
    Ssh {
        machine: String,
        /// Log in as this user.
        #[arg(long, short, default_value = "root")]
        user: String,
        /// Private key to use.
        #[arg(long, short = 'i')]
        identity: Option<std::path::PathBuf>,
        /// Replace the pinned host keys with the ones the machine last printed on its console
        /// (after it got new ones: an image that makes new keys at every boot, a new disk).
        #[arg(long)]
        repin_host_keys: bool,
        #[arg(last = true)]
        args: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum SshKeysCmd {
    List,
    /// Save a public key (text or a file) under a name.
    Add {
        name: String,
        key: String,
    },
    Delete {
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum ImagesCmd {
    List,
    /// Register an image from a JSON body such as images/tiny/build.sh writes (admin).
    Register {
        file: std::path::PathBuf,
    },
    /// New machines may no longer use it; machines made from it keep working (admin).
    Deprecate {
        image: String,
    },
    /// Undo `deprecate` (admin).
    Undeprecate {
        image: String,
    },
}

#[derive(Debug, Subcommand)]
enum HostsCmd {
    List,
    /// One host, with its evacuation's progress.
    Show {
        host: String,
    },
    /// Cordon the host and move each of its machines to another host with room (a running
    /// one is stopped, moved and started again; its disk goes with it).
    Evacuate {
        host: String,
        /// Follow the evacuation until no machine is left on the host (or some could not
        /// be moved).
        #[arg(long)]
        wait: bool,
    },
    Cordon {
        host: String,
    },
    Uncordon {
        host: String,
    },
    Delete {
        host: String,
    },
}

#[derive(Debug, Subcommand)]
enum UsersCmd {
    List {
        /// Accounts whose username or e-mail address contains this text.
        #[arg(long)]
        search: Option<String>,
        #[arg(long, value_enum)]
        role: Option<RoleArg>,
    },
    /// Disable an account: its sessions end at once, its machines keep running.
    Disable {
        user: String,
    },
    Enable {
        user: String,
    },
    /// Give an account the role `user` or `admin`.
    SetRole {
        user: String,
        #[arg(value_enum)]
        role: RoleArg,
    },
    /// An account's limits and usage.
    Quota {
        user: String,
    },
    /// Change an account's limits; each takes a number or `default` (the server's), and a
    /// limit not given keeps its value.
    SetQuota {
        user: String,
        #[arg(long)]
        machines: Option<Limit>,
        #[arg(long)]
        vcpus: Option<Limit>,
        #[arg(long)]
        memory_mib: Option<Limit>,
    },
}

/// `KEY=VALUE` on the command line (the server checks the rules).
fn parse_label(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected KEY=VALUE, not {text:?}"))
}

#[derive(Debug, Subcommand)]
enum TokensCmd {
    /// Mint a token; its secret is printed once.
    Create {
        name: String,
        #[arg(long, value_enum, default_value_t = ScopeArg::Read)]
        scope: ScopeArg,
        /// Days until it expires (1–365).
        #[arg(long, default_value_t = 30)]
        days: i64,
    },
    List,
    /// Revoke a token, by id or name.
    Delete {
        token: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ScopeArg {
    Read,
    Full,
}

/// A restart policy on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PolicyArg {
    Never,
    OnFailure,
}

impl From<PolicyArg> for RestartPolicy {
    fn from(p: PolicyArg) -> Self {
        match p {
            PolicyArg::Never => RestartPolicy::Never,
            PolicyArg::OnFailure => RestartPolicy::OnFailure,
        }
    }
}

/// A role on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum RoleArg {
    User,
    Admin,
}

impl From<RoleArg> for RoleName {
    fn from(r: RoleArg) -> Self {
        match r {
            RoleArg::User => RoleName::User,
            RoleArg::Admin => RoleName::Admin,
        }
    }
}

/// A quota limit on the command line: a number, or `default` for the server-wide one.
#[derive(Debug, Clone, Copy)]
enum Limit {
    Default,
    Value(i64),
}

impl std::str::FromStr for Limit {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "default" {
            return Ok(Limit::Default);
        }
        s.parse()
            .map(Limit::Value)
            .map_err(|_| format!("expected a number or 'default', not {s:?}"))
    }
}

impl Limit {
    /// The value `PUT /users/{id}/quota` takes for it; `None` from the flag keeps `current`.
    fn apply(flag: Option<Limit>, current: Option<i64>) -> Option<i64> {
        match flag {
            None => current,
            Some(Limit::Default) => None,
            Some(Limit::Value(n)) => Some(n),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// The machine in this status.
    Status(MachineStatus),
    /// The machine deleted and gone.
    Gone,
}

impl Target {
    const RUNNING: Target = Target::Status(MachineStatus::Running);
    const STOPPED: Target = Target::Status(MachineStatus::Stopped);
}

fn read_password(from_stdin: bool) -> CliResult<String> {
    let password = if from_stdin || !std::io::stdin().is_terminal() {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| CliError(format!("reading the password: {e}")))?;
        s.trim_end_matches(['\r', '\n']).to_owned()
    } else {
        rpassword::prompt_password("password: ")
            .map_err(|e| CliError(format!("reading the password: {e}")))?
    };
    if password.is_empty() {
        return fail("the password is empty");
    }
    Ok(password)
}

/// A key given on the command line: key text, a file with one, or a saved key's name.
fn key_argument(arg: &str) -> String {
    let path = std::path::Path::new(arg);
    if !arg.starts_with("ssh-") && !arg.starts_with("ecdsa-") && path.is_file() {
        if let Ok(text) = std::fs::read_to_string(path) {
            return text.trim().to_owned();
        }
    }
    arg.to_owned()
}

/// A machine's id from an id or a hostname (the caller's own machines).
async fn machine_id(api: &mut Api, machine: &str) -> CliResult<String> {
    if uuid::Uuid::parse_str(machine).is_ok() {
        return Ok(machine.to_owned());
    }
    let items = api.client().all_machines(None).await?;
    match items.into_iter().find(|m| m.hostname == machine) {
        Some(m) => Ok(m.id),
        None => fail(format!("no machine named {machine:?}")),
    }
}

/// Follows the machine until it reaches `target`, showing its status as it goes; fails when
/// it fails (unless `failed` is the target), and after `limit` when one is given. The server
/// answers the moment it gets there (`GET /machines/{id}/wait`); each wait is short so the
/// status shown stays current.
async fn wait_for(
    api: &mut Api,
    id: &str,
    target: Target,
    limit: Option<Duration>,
) -> CliResult<Option<MachineView>> {
    let started = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let mut last = String::new();
    let wanted = match target {
        Target::Status(status) => status,
        Target::Gone => MachineStatus::Deleted,
    };
    loop {
        if let Some(limit) = limit.filter(|l| started.elapsed() >= *l) {
            if tty {
                eprintln!();
            }
            return fail(format!(
                "machine {id} did not become {wanted} within {} s (it is {})",
                limit.as_secs(),
                if last.is_empty() { "unknown" } else { &last }
            ));
        }
        let answer = match api.client().wait_machine(id, wanted, "3s").await {
            // Not there yet: show where it is.
            Err(e) if e.status() == Some(408) => api.client().machine(id).await,
            other => other,
        };
        let machine = match answer {
            Ok(m) => m,
            Err(e) if target == Target::Gone && e.status() == Some(404) => {
                if tty {
                    eprintln!();
                }
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        let status = machine.status;
        if status == MachineStatus::Failed && wanted != MachineStatus::Failed {
            if tty {
                eprintln!();
            }
            return fail(format!(
                "machine {id} failed: {}",
                machine
                    .failure_reason
                    .as_deref()
                    .unwrap_or("no reason given")
            ));
        }
        if tty {
            eprint!(
                "\r{:<12} {:>5.1} s",
                status.as_str(),
                started.elapsed().as_secs_f64()
            );
            let _ = std::io::stderr().flush();
        } else if status.as_str() != last {
            eprintln!("{status} after {:.1} s", started.elapsed().as_secs_f64());
        }
        if status == wanted {
            if tty {
                eprintln!();
            }
            return Ok((target != Target::Gone).then_some(machine));
        }
        if status == MachineStatus::Deleted {
            if tty {
                eprintln!();
            }
            return fail(format!("machine {id} was deleted while waiting for it"));
        }
        last = status.as_str().to_owned();
    }
}

/// Follows an evacuation until no machine is left on the host; fails when the moves are
/// over and some machines could not be moved (their events say why).
async fn evacuation_done(
    api: &mut Api,
    id: &str,
    name: &str,
) -> CliResult<skygate_api_types::HostView> {
    let started = Instant::now();
    let mut last = (-1, -1);
    loop {
        let h = api.client().host(id).await?;
        let Some(e) = h.evacuation.as_ref() else {
            return fail(format!(
                "the evacuation of {name} was ended (it was uncordoned)"
            ));
        };
        let (left, moving) = (e.machines_left, e.moving);
        if (left, moving) != last {
            eprintln!(
                "{left} machine(s) left on {name}, {moving} moving, after {:.1} s",
                started.elapsed().as_secs_f64()
            );
            last = (left, moving);
        }
        if left == 0 {
            return Ok(h);
        }
        if moving == 0 {
            return fail(format!(
                "{left} machine(s) could not be moved off {name}: see their events \
                 (skygate machines events ...), or evacuate again once they settle"
            ));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn run(cli: Cli) -> CliResult<()> {
    let mut api = Api::new(cli.api)?;
    let result = command(&mut api, cli.output, cli.command).await;
    // A refresh during the command spent the saved refresh token: keep the new one, whatever
    // the command's outcome.
    api.save_renewed()?;
    result
}

async fn command(api: &mut Api, out: Output, command: Command) -> CliResult<()> {
    match command {
        Command::Login {
            username,
            password_stdin,
        } => {
            let password = read_password(password_stdin)?;
            api.login(&username, &password).await?;
            eprintln!("logged in to {} as {username}", api.base());
        }
        Command::Register {
            username,
            email,
            password_stdin,
        } => {
            let password = read_password(password_stdin)?;
            let user = api
                .client()
                .register(&RegisterParams {
                    username,
                    email,
                    password,
                })
                .await?;
            print_one(out, &user, output::USER);
        }
        Command::Logout => {
            api.logout().await?;
            eprintln!("logged out");
        }
        Command::Machines(cmd) => machines(api, out, cmd).await?,
        Command::SshKeys(cmd) => match cmd {
            SshKeysCmd::List => {
                let keys = api.client().all_ssh_keys().await?;
                print_rows(out, &keys, output::SSH_KEY);
            }
            SshKeysCmd::Add { name, key } => {
                let params = AddSshKeyParams {
                    name,
                    public_key: key_argument(&key),
                };
                let key = api.client().add_ssh_key(&params).await?;
                print_one(out, &key, output::SSH_KEY);
            }
            SshKeysCmd::Delete { id } => api.client().delete_ssh_key(&id).await?,
        },
        Command::Images(cmd) => match cmd {
            ImagesCmd::List => {
                let images = api.client().images().await?;
                print_rows(out, &images.items, output::IMAGE_ROW);
            }
            ImagesCmd::Register { file } => {
                let text = std::fs::read_to_string(&file)
                    .map_err(|e| CliError(format!("{}: {e}", file.display())))?;
                let params: RegisterImageParams = serde_json::from_str(&text).map_err(|e| {
                    CliError(format!("{}: not an image description: {e}", file.display()))
                })?;
                let image = api.client().register_image(&params).await?;
                print_one(out, &image, output::IMAGE);
            }
            ImagesCmd::Deprecate { image } => {
                let id = image_id(api, &image).await?;
                let image = api.client().set_image_deprecated(&id, true).await?;
                print_one(out, &image, output::IMAGE);
            }
            ImagesCmd::Undeprecate { image } => {
                let id = image_id(api, &image).await?;
                let image = api.client().set_image_deprecated(&id, false).await?;
                print_one(out, &image, output::IMAGE);
            }
        },
        Command::Hosts(cmd) => match cmd {
            HostsCmd::List => {
                let hosts = api.client().hosts().await?;
                print_rows(out, &hosts.items, output::HOST);
            }
            HostsCmd::Show { host } => {
                let id = host_id(api, &host).await?;
                let h = api.client().host(&id).await?;
                print_one(out, &h, output::HOST);
            }
            HostsCmd::Evacuate { host, wait } => {
                let id = host_id(api, &host).await?;
                let mut h = api.client().evacuate_host(&id).await?;
                if wait {
                    h = evacuation_done(api, &id, &host).await?;
                }
                print_one(out, &h, output::HOST);
            }
            HostsCmd::Cordon { host } => {
                let id = host_id(api, &host).await?;
                let h = api.client().set_cordoned(&id, true).await?;
                print_one(out, &h, output::HOST);
            }
            HostsCmd::Uncordon { host } => {
                let id = host_id(api, &host).await?;
                let h = api.client().set_cordoned(&id, false).await?;
                print_one(out, &h, output::HOST);
            }
            HostsCmd::Delete { host } => {
                let id = host_id(api, &host).await?;
                api.client().delete_host(&id).await?;
            }
        },
        Command::Profile => {
            let me = api.client().profile().await?;
            output::print_profile(out, &me);
        }
        Command::Users(cmd) => users(api, out, cmd).await?,
        Command::Tokens(cmd) => tokens(api, out, cmd).await?,
        Command::Audit { limit } => {
            let page = PageQuery {
                limit: Some(limit),
                cursor: None,
            };
            let events = api.client().audit_events(&page).await?;
            print_rows(out, &events.items, output::AUDIT_EVENT);
        }
    }
    Ok(())
}

async fn users(api: &mut Api, out: Output, cmd: UsersCmd) -> CliResult<()> {
    match cmd {
        UsersCmd::List { search, role } => {
            let query = ListUsersQuery {
                search,
                role: role.map(Into::into),
                ..ListUsersQuery::default()
            };
            let users = api.client().all_users(&query).await?;
            print_rows(out, &users, output::USER);
        }
        UsersCmd::Disable { user } => {
            let id = user_id(api, &user).await?;
            let u = api.client().set_user_disabled(&id, true).await?;
            print_one(out, &u, output::USER);
        }
        UsersCmd::Enable { user } => {
            let id = user_id(api, &user).await?;
            let u = api.client().set_user_disabled(&id, false).await?;
            print_one(out, &u, output::USER);
        }
        UsersCmd::SetRole { user, role } => {
            let id = user_id(api, &user).await?;
            let u = api.client().set_user_role(&id, role.into()).await?;
            print_one(out, &u, output::USER);
        }
        UsersCmd::Quota { user } => {
            let id = user_id(api, &user).await?;
            let q = api.client().quota(&id).await?;
            print_one(out, &q, output::QUOTA);
        }
        UsersCmd::SetQuota {
            user,
            machines,
            vcpus,
            memory_mib,
        } => {
            let id = user_id(api, &user).await?;
            let now = api.client().quota(&id).await?.overrides;
            let limits = QuotaParams {
                max_machines: Limit::apply(machines, now.max_machines),
                max_vcpus: Limit::apply(vcpus, now.max_vcpus),
                max_memory_mib: Limit::apply(memory_mib, now.max_memory_mib),
            };
            let q = api.client().set_quota(&id, &limits).await?;
            print_one(out, &q, output::QUOTA);
        }
    }
    Ok(())
}

async fn tokens(api: &mut Api, out: Output, cmd: TokensCmd) -> CliResult<()> {
    match cmd {
        TokensCmd::Create { name, scope, days } => {
            let scope = match scope {
                ScopeArg::Read => TokenScope::Read,
                ScopeArg::Full => TokenScope::Full,
            };
            let params = CreateTokenParams {
                name,
                scope,
                expires_in_days: days,
            };
            let created = api.client().create_token(&params).await?;
            output::print_created_token(out, &created);
        }
        TokensCmd::List => {
            let tokens = api.client().tokens_list().await?;
            print_rows(out, &tokens.items, output::TOKEN);
        }
        TokensCmd::Delete { token } => {
            let id = if uuid::Uuid::parse_str(&token).is_ok() {
                token
            } else {
                api.client()
                    .tokens_list()
                    .await?
                    .items
                    .into_iter()
                    .find(|t| t.name == token)
                    .map(|t| t.id)
                    .ok_or_else(|| CliError(format!("no API token named {token:?}")))?
            };
            api.client().delete_token(&id).await?;
        }
    }
    Ok(())
}

/// An account's id from an id or a username.
async fn user_id(api: &mut Api, user: &str) -> CliResult<String> {
    if uuid::Uuid::parse_str(user).is_ok() {
        return Ok(user.to_owned());
    }
    let query = ListUsersQuery {
        search: Some(user.to_owned()),
        ..ListUsersQuery::default()
    };
    api.client()
        .all_users(&query)
        .await?
        .into_iter()
        .find(|u| u.username == user)
        .map(|u| u.id)
        .ok_or_else(|| CliError(format!("no account named {user:?}")))
}

/// An image's id from an id or a name.
async fn image_id(api: &mut Api, image: &str) -> CliResult<String> {
    if uuid::Uuid::parse_str(image).is_ok() {
        return Ok(image.to_owned());
    }
    api.client()
        .images()
        .await?
        .items
        .into_iter()
        .find(|i| i.name == image)
        .map(|i| i.id)
        .ok_or_else(|| CliError(format!("no image named {image:?}")))
}

/// A host's id from an id or a name.
async fn host_id(api: &mut Api, host: &str) -> CliResult<String> {
    if uuid::Uuid::parse_str(host).is_ok() {
        return Ok(host.to_owned());
    }
    let hosts = api.client().hosts().await?;
    hosts
        .items
        .into_iter()
        .find(|h| h.name == host)
        .map(|h| h.id)
        .ok_or_else(|| CliError(format!("no host named {host:?}")))
}

/// How long `machines ssh` waits for a booting guest to print its host keys.
const HOST_KEY_WAIT: Duration = Duration::from_secs(60);

/// The host keys machine `id` last printed on its serial console, polling while the guest is
/// still booting; one line naming what was missing when it never prints them.
async fn console_host_keys(
    api: &mut Api,
    machine: &str,
    id: &str,
) -> CliResult<Vec<host_keys::HostKey>> {
    let deadline = Instant::now() + HOST_KEY_WAIT;
    let mut told = false;
    loop {
        let error = match api.client().console(id).await {
            Ok(text) => match host_keys::last_key_block(&text) {
                Some(keys) if !keys.is_empty() => return Ok(keys),
                _ => None,
            },
            // A machine that is not on a host yet has no console to read: keep waiting.
            Err(e) => Some(CliError::from(e)),
        };
        if Instant::now() >= deadline {
            let why = match error {
                Some(e) => format!(" (the last console read failed: {e})"),
                None => format!(
                    " (`skygate machines console {machine}` shows what it printed; only its \
                     last 64 KiB are read, so a chatty guest may have scrolled the keys out)"
                ),
            };
            return fail(format!(
                "machine {machine} has not printed its SSH host keys on its console within {} s, \
                 so they cannot be pinned{why}",
                HOST_KEY_WAIT.as_secs()
            ));
        }
        if !told {
            eprintln!(
                "waiting up to {} s for {machine} to print its SSH host keys on its console",
                HOST_KEY_WAIT.as_secs()
            );
            told = true;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn machines(api: &mut Api, out: Output, cmd: MachinesCmd) -> CliResult<()> {
    match cmd {
        MachinesCmd::Create {
            hostname,
            image,
            vcpus,
            memory_mib,
            disk_gib,
            ssh_keys,
            user_data,
            restart_policy,
            labels,
            wait,
        } => {
            let user_data = match user_data {
                Some(path) => Some(
                    std::fs::read_to_string(&path)
                        .map_err(|e| CliError(format!("{}: {e}", path.display())))?,
                ),
                None => None,
            };
            let params = CreateMachineParams {
                hostname,
                image,
                vcpus: i64::from(vcpus),
                memory_mib: i64::try_from(memory_mib).unwrap_or(i64::MAX),
                disk_gib: i64::try_from(disk_gib).unwrap_or(i64::MAX),
                ssh_keys: ssh_keys.iter().map(|k| key_argument(k)).collect(),
                user_data,
                restart_policy: Some(restart_policy.into()),
                labels: labels.into_iter().collect(),
            };
            let mut machine = api.client().create_machine(&params).await?;
            if wait {
                if let Some(m) = wait_for(api, &machine.id.clone(), Target::RUNNING, None).await? {
                    machine = m;
                }
            }
            output::print_machine(out, &machine);
        }
        MachinesCmd::List { status, label } => {
            let query = ListMachinesQuery {
                status,
                label,
                ..ListMachinesQuery::default()
            };
            let items = api.client().all_machines_matching(&query).await?;
            print_rows(out, &items, output::MACHINE_ROW);
        }
        MachinesCmd::Show { machine } => {
            let id = machine_id(api, &machine).await?;
            let m = api.client().machine(&id).await?;
            output::print_machine(out, &m);
        }
        MachinesCmd::Start { machine, wait } => {
            let target = wait.then_some(Target::RUNNING);
            action(api, out, &machine, MachineAction::Start, target).await?
        }
        MachinesCmd::Stop { machine, wait } => {
            let target = wait.then_some(Target::STOPPED);
            action(api, out, &machine, MachineAction::Stop, target).await?
        }
        MachinesCmd::Reboot { machine, wait } => {
            let target = wait.then_some(Target::RUNNING);
            action(api, out, &machine, MachineAction::Reboot, target).await?
        }
        MachinesCmd::Label {
            machine,
            set,
            remove,
        } => {
            let id = machine_id(api, &machine).await?;
            let mut labels: std::collections::BTreeMap<String, Option<String>> =
                remove.into_iter().map(|k| (k, None)).collect();
            labels.extend(set.into_iter().map(|(k, v)| (k, Some(v))));
            let patch = MachinePatch {
                restart_policy: None,
                labels: Some(labels),
            };
            let m = api.client().patch_machine(&id, &patch).await?;
            output::print_machine(out, &m);
        }
        MachinesCmd::Wait {
            machine,
            status,
            timeout,
        } => {
            let wanted: MachineStatus = status
                .parse()
                .map_err(|e| CliError(format!("--status: {e}")))?;
            let id = machine_id(api, &machine).await?;
            let limit = Some(Duration::from_secs(timeout));
            let target = if wanted == MachineStatus::Deleted {
                Target::Gone
            } else {
                Target::Status(wanted)
            };
            match wait_for(api, &id, target, limit).await? {
                Some(m) => output::print_machine(out, &m),
                None => eprintln!("deleted"),
            }
        }
        MachinesCmd::Resize {
            machine,
            vcpus,
            memory_mib,
            disk_gib,
            wait,
        } => {
            let id = machine_id(api, &machine).await?;
            let size = ResizeParams {
                vcpus: vcpus.map(i64::from),
                memory_mib: memory_mib.map(|m| i64::try_from(m).unwrap_or(i64::MAX)),
                disk_gib: disk_gib.map(|d| i64::try_from(d).unwrap_or(i64::MAX)),
            };
            let mut m = api.client().resize_machine(&id, &size).await?;
            if wait {
                if let Some(settled) = wait_for(api, &id, Target::STOPPED, None).await? {
                    m = settled;
                }
            }
            output::print_machine(out, &m);
        }
        MachinesCmd::Rebuild {
            machine,
            image,
            yes,
            wait,
        } => {
            if !yes {
                return fail(format!(
                    "a rebuild erases what {machine}'s disk holds; add --yes to go ahead"
                ));
            }
            let id = machine_id(api, &machine).await?;
            let mut m = api
                .client()
                .rebuild_machine(&id, &RebuildParams { image })
                .await?;
            // A fresh disk makes new host keys: the pinned ones would refuse the machine. The
            // next `machines ssh` pins the new ones from its console.
            if let Err(e) =
                KnownHosts::in_config_dir().and_then(|k| k.forget(&host_keys::alias(&id)))
            {
                eprintln!("skygate: warning: could not unpin the machine's host keys: {e}");
            }
            if wait {
                let target = Target::Status(match m.desired_state {
                    DesiredState::Running => MachineStatus::Running,
                    _ => MachineStatus::Stopped,
                });
                if let Some(settled) = wait_for(api, &id, target, None).await? {
                    m = settled;
                }
            }
            output::print_machine(out, &m);
        }
        MachinesCmd::SetRestartPolicy { machine, policy } => {
            let id = machine_id(api, &machine).await?;
            let patch = MachinePatch {
                restart_policy: Some(policy.into()),
                labels: None,
            };
            let m = api.client().patch_machine(&id, &patch).await?;
            output::print_machine(out, &m);
        }
        MachinesCmd::Delete { machine, wait } => {
            let id = machine_id(api, &machine).await?;
            let m = api.client().delete_machine(&id).await?;
            // Its id is never reused, so its pinned host keys can go now; failing to drop them
            // is not worth failing the delete for.
            if let Err(e) =
                KnownHosts::in_config_dir().and_then(|k| k.forget(&host_keys::alias(&id)))
            {
                eprintln!("skygate: warning: could not unpin the machine's host keys: {e}");
            }
            if wait {
                wait_for(api, &id, Target::Gone, None).await?;
                eprintln!("deleted");
            } else {
                output::print_machine(out, &m);
            }
        }
        MachinesCmd::Events { machine } => {
            let id = machine_id(api, &machine).await?;
            let page = PageQuery {
                limit: Some(200),
                cursor: None,
            };
            let events = api.client().machine_events(&id, &page).await?;
            print_rows(out, &events.items, output::EVENT);
        }
        MachinesCmd::Console { machine } => {
            let id = machine_id(api, &machine).await?;
            let text = api.client().console(&id).await?;
            print!("{text}");
        }
        MachinesCmd::Ssh {
            machine,
            user,
            identity,
            repin_host_keys,
            args,
        } => {
            let id = machine_id(api, &machine).await?;
            let m = api.client().machine(&id).await?;
            let Some(port) = m.network.ports.iter().find(|p| p.guest == 22) else {
                return fail(format!(
                    "machine {machine} has no forwarded ssh port (status {})",
                    m.status
                ));
            };
            let known = KnownHosts::in_config_dir()?;
            let alias = host_keys::alias(&id);
            if repin_host_keys {
                let keys = console_host_keys(api, &machine, &id).await?;
                known.replace(&alias, &keys)?;
                eprintln!(
                    "pinned {} host key(s) of {machine} from its console",
                    keys.len()
                );
            } else if known.pinned(&alias)?.is_none() {
                let keys = console_host_keys(api, &machine, &id).await?;
                if known.pin_if_absent(&alias, &keys)? == Pinned::Added {
                    eprintln!(
                        "pinned {} host key(s) of {machine} from its console",
                        keys.len()
                    );
                }
            }
            let target = ssh::Target {
                alias: &alias,
                known_hosts: known.path(),
                host_ip: &port.host_ip,
                port: port.host_port,
                user: &user,
                identity: identity.as_deref(),
            };
            let (status, stderr) = ssh::run(&ssh::args(&target, &args)?)?;
            if !status.success() {
                return fail(ssh::failure_line(
                    status,
                    &stderr,
                    &machine,
                    &alias,
                    known.path(),
                ));
            }
        }
    }
    Ok(())
}

async fn action(
    api: &mut Api,
    out: Output,
    machine: &str,
    verb: MachineAction,
    wait: Option<Target>,
) -> CliResult<()> {
    let id = machine_id(api, machine).await?;
    let mut m = api.client().machine_action(&id, verb).await?;
    if let Some(target) = wait {
        if let Some(settled) = wait_for(api, &id, target, None).await? {
            m = settled;
        }
    }
    output::print_machine(out, &m);
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("skygate: {e}");
            ExitCode::FAILURE
        }
    }
}
