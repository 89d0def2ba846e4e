//! The `tether` binary: parse the command line, load the configuration, set up
//! logging, run until SIGTERM/SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tether::Config;

/// mimalloc: hyper and tether allocate and free small blocks on every request, often
/// on different threads; glibc's malloc spent ~5 % of tether's CPU on them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit status for a configuration error (sysexits' EX_USAGE).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "tether",
    version = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("BUILD_COMMIT_OF_TETHER"), ")"),
    about = "A connection-governing egress proxy"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the default).
    Run(RunArgs),
    /// Print the effective configuration, or every error in it (exit 64).
    CheckConfig {
        /// Config file; the embedded default when omitted.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Show the leak and the fix: a leaky client against a fake registry, first
    /// without tether, then through it (loopback only; ends by itself).
    #[cfg(feature = "demo")]
    Demo(DemoArgs),
    /// A build without the demo (the default: the proxy's build holds no test
    /// peers) still knows the word, to say how to get the demo.
    #[cfg(not(feature = "demo"))]
    #[command(hide = true)]
    Demo {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
        args: Vec<String>,
    },
    /// Print, apply or remove the iptables rules that redirect this network
    /// namespace's outbound connections to given ports to the transparent listener,
    /// leaving tether's own connections (by uid) and local destinations alone.
    Iptables(IptablesArgs),
    /// Print a shell completion script: `tether completions bash >
    /// /etc/bash_completion.d/tether` (zsh: a `_tether` file on $fpath; fish:
    /// ~/.config/fish/completions/tether.fish).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff): `tether man > /usr/share/man/man1/tether.1`, and
    /// `tether man check-config > .../tether-check-config.1` for each subcommand.
    Man {
        /// The subcommand whose page to print (tether-SUBCOMMAND(1)).
        subcommand: Option<String>,
    },
}

#[derive(clap::Args)]
struct IptablesArgs {
    #[arg(value_enum)]
    action: IptablesAction,
    /// A destination port to redirect (repeatable) [default: `ports` of the
    /// config's [transparent] section].
    #[arg(long = "port", value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    ports: Vec<u16>,
    /// The transparent listener's port [default: the port of the config's
    /// [transparent] listen].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    proxy_port: Option<u16>,
    /// The uid tether runs as; its connections are never redirected. Required for
    /// print and apply.
    #[arg(long)]
    uid: Option<u32>,
    /// Also write the rules with ip6tables (the listener must then take IPv6 too,
    /// e.g. listen = "[::]:15001").
    #[arg(long)]
    ipv6: bool,
    /// Config file to take the ports from; the embedded default when omitted.
    #[arg(long, short)]
    config: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum IptablesAction {
    /// Print the commands apply would run.
    Print,
    /// Replace tether's rules with these (idempotent).
    Apply,
    /// Remove tether's rules, if any.
    Remove,
}

#[cfg(feature = "demo")]
#[derive(clap::Args)]
struct DemoArgs {
    /// Each run spreads its preheats over this long; after the tether run, the demo
    /// waits at most this long again for the sockets to be reaped.
    #[arg(long, default_value = "8s", value_parser = humantime::parse_duration)]
    duration: std::time::Duration,
    /// Preheats per run. Each is five requests (`/v2/`, a token, the manifest, two
    /// platform manifests), each on a new connection that is never closed.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..))]
    preheats: u64,
    /// tether's cap on sockets to the registry, and to the auth server.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..))]
    cap: u64,
    /// tether's upstream idle timeout [default: a quarter of --duration, 200ms to 2s].
    #[arg(long, value_parser = humantime::parse_duration)]
    idle_timeout: Option<std::time::Duration>,
    /// Preheats started together in each burst, and at most in flight at once.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..))]
    concurrency: u64,
}

#[derive(clap::Args, Clone)]
struct RunArgs {
    /// Config file (TOML); the embedded default when omitted.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::CheckConfig { config }) => check_config(config),
        Some(Command::Run(args)) => run(args),
        #[cfg(feature = "demo")]
        Some(Command::Demo(args)) => demo(args),
        #[cfg(not(feature = "demo"))]
        Some(Command::Demo { .. }) => no_demo(),
        Some(Command::Iptables(args)) => iptables(args),
        Some(Command::Completions { shell }) => {
            use clap::CommandFactory;
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "tether", &mut script);
            print_out(&script)
        }
        Some(Command::Man { subcommand }) => man(subcommand),
        None => run(cli.run),
    }
}

/// `tether man [SUBCOMMAND]`: the page of tether or of one subcommand.
fn man(subcommand: Option<String>) -> ExitCode {
    use clap::CommandFactory;
    let cli = Cli::command();
    let (command, title) = match subcommand {
        None => (cli, "tether".to_string()),
        Some(name) => match cli.find_subcommand(&name) {
            Some(sub) => (
                sub.clone().bin_name(format!("tether {name}")),
                format!("tether-{name}"),
            ),
            None => {
                eprintln!("error: tether has no subcommand {name:?}");
                return ExitCode::from(2);
            }
        },
    };
    let mut page = Vec::new();
    match clap_mangen::Man::new(command)
        .title(title)
        .render(&mut page)
    {
        Ok(()) => print_out(&page),
        Err(e) => {
            eprintln!("man: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Writes generated text to stdout; a closed pipe (`| head`) is not a panic.
fn print_out(bytes: &[u8]) -> ExitCode {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(path: Option<PathBuf>) -> ExitCode {
    match Config::load(path.as_deref()) {
        Ok(config) => {
            print!("{}", config.to_toml());
            ExitCode::SUCCESS
        }
        Err(e) => {
            for problem in &e.0 {
                eprintln!("error: {problem}");
            }
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

fn run(args: RunArgs) -> ExitCode {
    init_tracing(args.log_format);
    let config = match Config::load(args.config.as_deref()) {
        Ok(config) => config,
        Err(e) => {
            for problem in &e.0 {
                tracing::error!("config: {problem}");
            }
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let runtime = tether::instance::runtime(config.proxy.worker_threads)
        .build()
        .expect("tokio runtime");
    let code = runtime.block_on(async move {
        let running = match tether::start(config).await {
            Ok(r) => r,
            Err(tether::StartError::Config(e)) => {
                tracing::error!("{e}");
                return ExitCode::from(EXIT_CONFIG);
            }
            Err(e) => {
                tracing::error!("{e}");
                return ExitCode::FAILURE;
            }
        };
        let mut signals = Signals::new();
        signals
            .serve_until_stopped(&running, args.config.as_deref())
            .await;
        tracing::info!("shutting down (a second SIGTERM or SIGINT exits at once)");
        tokio::select! {
            cut = running.shutdown() => {
                if cut > 0 {
                    tracing::warn!(cut, "client connections were cut at drain_timeout");
                }
                ExitCode::SUCCESS
            }
            (signal, number) = signals.stop() => {
                tracing::warn!(signal, "second stop signal during the drain: exiting at once");
                // 128 + the signal's number, as a shell reports a process it killed.
                ExitCode::from(128 + number)
            }
        }
    });
    // Not waiting for blocking tasks (DNS lookups) on the way out: after a forced
    // exit nothing is owed to them, and after a drain nothing is left.
    runtime.shutdown_background();
    code
}

#[cfg(feature = "demo")]
fn demo(args: DemoArgs) -> ExitCode {
    use std::io::IsTerminal;
    // The view is on stdout. tether's own log lines (warnings unless RUST_LOG asks
    // for more) go to stderr, except while a live view is drawn in place on a
    // terminal: a line printed into it would shift the redraw. Then they go to a
    // file, named after the summary; the leak diagnosis is a line of the view.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let live = std::io::stdout().is_terminal();
    let log_file = std::env::temp_dir().join(format!("tether-demo-{}.log", std::process::id()));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match live.then(|| std::fs::File::create(&log_file)) {
        Some(Ok(file)) => builder
            .with_ansi(false)
            .with_writer(std::sync::Mutex::new(file))
            .init(),
        Some(Err(e)) => {
            eprintln!(
                "demo: cannot write {}: {e}; tether's log is off",
                log_file.display()
            );
            builder.with_writer(std::io::sink).init();
        }
        None => builder.with_writer(std::io::stderr).init(),
    }
    let options = tether::demo::DemoOptions {
        preheats: args.preheats as usize,
        duration: args.duration,
        cap: args.cap as usize,
        idle_timeout: args.idle_timeout,
        concurrency: args.concurrency as usize,
    };
    let stdout = std::io::stdout();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut out = stdout.lock();
    let result = runtime.block_on(tether::demo::run(options, &mut out, live));
    if live && log_file.metadata().is_ok_and(|m| m.len() > 0) {
        println!("tether's log during the demo: {}", log_file.display());
    } else if live {
        let _ = std::fs::remove_file(&log_file);
    }
    match result {
        Ok(report) if report.passed() => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("demo: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `tether demo` in a build without it: a usage error (exit 2, as clap's own) that
/// names the command that has it.
#[cfg(not(feature = "demo"))]
fn no_demo() -> ExitCode {
    use clap::CommandFactory;
    Cli::command()
        .error(
            clap::error::ErrorKind::InvalidSubcommand,
            "this tether was built without the demo; \
             run it with `cargo run --release --features demo -- demo`",
        )
        .exit()
}

fn iptables(args: IptablesArgs) -> ExitCode {
    use tether::iptables;
    let usage = |message: String| {
        eprintln!("error: {message}");
        ExitCode::from(EXIT_CONFIG)
    };
    let failed = |e: std::io::Error| {
        eprintln!("error: {e}");
        ExitCode::FAILURE
    };
    if args.action == IptablesAction::Remove {
        return match iptables::remove(args.ipv6) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => failed(e),
        };
    }
    let config = match Config::load(args.config.as_deref()) {
        Ok(config) => config.transparent,
        Err(e) => return usage(e.to_string()),
    };
    let ports = if args.ports.is_empty() {
        config.ports
    } else {
        args.ports
    };
    if ports.is_empty() {
        return usage(
            "no ports to redirect: give --port, or a --config whose [transparent] has ports".into(),
        );
    }
    let Some(proxy_port) = args
        .proxy_port
        .or(Some(config.listen.port()).filter(|p| *p != 0))
    else {
        return usage("the config's transparent.listen has port 0: give --proxy-port".into());
    };
    if ports.contains(&proxy_port) {
        return usage(format!(
            "port {proxy_port} is the transparent listener's own: redirecting it would loop"
        ));
    }
    let Some(uid) = args.uid else {
        return usage(
            "--uid is required: the uid tether runs as, whose connections must not be redirected"
                .into(),
        );
    };
    let rules = iptables::Rules {
        ports,
        proxy_port,
        uid,
        ipv6: args.ipv6,
    };
    match args.action {
        IptablesAction::Print => {
            for invocation in rules.install() {
                println!("{invocation}");
            }
            ExitCode::SUCCESS
        }
        _ => match iptables::apply(&rules) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => failed(e),
        },
    }
}

/// The signals `tether run` obeys: SIGTERM and SIGINT stop it (a second one during
/// the drain exits at once), SIGHUP reloads the configuration file.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Signals {
        use tokio::signal::unix::{signal, SignalKind};
        Signals {
            term: signal(SignalKind::terminate()).expect("SIGTERM handler"),
            int: signal(SignalKind::interrupt()).expect("SIGINT handler"),
            hup: signal(SignalKind::hangup()).expect("SIGHUP handler"),
        }
    }

    /// The next SIGTERM or SIGINT: its name and number.
    async fn stop(&mut self) -> (&'static str, u8) {
        Self::either(&mut self.term, &mut self.int).await
    }

    async fn either(
        term: &mut tokio::signal::unix::Signal,
        int: &mut tokio::signal::unix::Signal,
    ) -> (&'static str, u8) {
        tokio::select! {
            _ = term.recv() => ("SIGTERM", 15),
            _ = int.recv() => ("SIGINT", 2),
        }
    }

    /// Runs until SIGTERM or SIGINT, reloading the configuration on SIGHUP.
    async fn serve_until_stopped(
        &mut self,
        running: &tether::Running,
        config: Option<&std::path::Path>,
    ) {
        loop {
            tokio::select! {
                (signal, _) = Self::either(&mut self.term, &mut self.int) => {
                    tracing::info!(signal, "stop signal received");
                    return;
                }
                _ = running.shared.drain_requested() => {
                    tracing::info!("drain requested on the admin listener");
                    return;
                }
                _ = self.hup.recv() => {
                    tracing::info!("SIGHUP: reloading the configuration");
                    // Errors are logged by reload; the running configuration stays.
                    let _ = running.reload_from(config).await;
                }
            }
        }
    }
}

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
