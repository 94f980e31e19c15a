//! Starting and owning the test servers' processes, shared by every server module: find the
//! tools in the cache venv, spawn a child tied to the test process, read the port it prints, keep
//! the last lines of its output for failure messages, and a bounded HTTP GET to check on it.

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::Duration;

/// Bounds every wait for a server to come up; moto is ready in < 1 s on an idle machine, but
/// tests start while the compiler may still hold both cores.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

pub fn tool_path(var: &str, venv_file: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(var).filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME").unwrap_or_default();
    Path::new(&home)
        .join(".cache/nightcopy-tools/venv-1/bin")
        .join(venv_file)
}

/// The Python that runs the test servers: `NIGHTCOPY_PYTHON`, else the cache venv's.
pub fn python() -> PathBuf {
    tool_path("NIGHTCOPY_PYTHON", "python")
}

/// Path of a script in `tests/servers/`.
pub fn server_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/servers")
        .join(name)
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("cannot bind 127.0.0.1:0 to find a free port")
}

/// Spawns a server with stdout and stderr drained into `output` (a pipe nobody reads would
/// eventually block a chatty server such as moto, which logs every request).
pub fn spawn_server(mut cmd: Command, output: &Output, name: &str) -> io::Result<Child> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = spawn_tied(cmd)?;
    output.drain(child.stdout.take(), name);
    output.drain(child.stderr.take(), name);
    Ok(child)
}

/// Spawns a server that prints its port as the first stdout line, and waits (bounded) for it.
pub fn spawn_with_port_line(cmd: Command, output: &Output, name: &str) -> io::Result<(Child, u16)> {
    let (mut child, first) = spawn_with_first_line(cmd, output, name, "its port")?;
    match first.trim().parse() {
        Ok(port) => Ok((child, port)),
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(io::Error::other(format!(
                "{name} printed {first:?} instead of a port"
            )))
        }
    }
}

/// Spawns a server and waits (bounded) for the first line of its stdout (`what` names it in
/// errors); the rest of its output goes to `output`.
pub fn spawn_with_first_line(
    mut cmd: Command,
    output: &Output,
    name: &str,
    what: &str,
) -> io::Result<(Child, String)> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = spawn_tied(cmd)?;
    let stderr_done = output.drain(child.stderr.take(), name);
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    let out = output.clone();
    let tag = name.to_owned();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let _ = tx.send(lines.next().transpose());
        for line in lines.map_while(Result::ok) {
            out.push(&tag, &line);
        }
    });
    match rx.recv_timeout(STARTUP_TIMEOUT) {
        Ok(Ok(Some(line))) => Ok((child, line)),
        Ok(Ok(None)) => {
            let _ = child.wait();
            // Let the traceback reach the buffer before the caller quotes it.
            let _ = stderr_done.recv_timeout(Duration::from_secs(2));
            Err(io::Error::other(format!(
                "{name} exited before printing {what}"
            )))
        }
        Ok(Err(e)) => Err(e),
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(io::Error::other(format!(
                "{name} did not print {what} within {STARTUP_TIMEOUT:?}"
            )))
        }
    }
}

/// The last lines of the servers' stdout/stderr, kept for failure messages.
#[derive(Clone, Default)]
pub struct Output(Arc<Mutex<VecDeque<String>>>);

impl Output {
    const KEEP: usize = 200;

    fn push(&self, name: &str, line: &str) {
        let mut q = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() == Self::KEEP {
            q.pop_front();
        }
        q.push_back(format!("[{name}] {line}"));
    }

    pub fn tail(&self) -> String {
        let q = self.0.lock().unwrap_or_else(|e| e.into_inner());
        q.iter().map(|l| format!("{l}\n")).collect()
    }

    /// Copies `stream` line by line into the buffer on a thread; the receiver gets a message at
    /// end of stream, so a caller can wait (bounded) for a dead child's last words.
    pub fn drain<R: Read + Send + 'static>(
        &self,
        stream: Option<R>,
        name: &str,
    ) -> mpsc::Receiver<()> {
        let (done, finished) = mpsc::channel();
        let Some(stream) = stream else {
            return finished;
        };
        let out = self.clone();
        let tag = name.to_owned();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                out.push(&tag, &line);
            }
            let _ = done.send(());
        });
        finished
    }
}

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns `cmd` so that the child is SIGKILLed when the test process dies, however it dies.
///
/// Trap: PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not the process.
/// Test threads end with their test, so every child is forked by one dedicated thread that never
/// returns; the signal then fires only when the whole process goes.
pub fn spawn_tied(mut cmd: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<mpsc::Sender<SpawnRequest>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("test-server-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
                // The sender lives in a static, so the loop never ends; if it ever did, this
                // thread must still not exit.
                loop {
                    std::thread::park();
                }
            })
            .expect("cannot start the server-spawning thread");
        tx
    });

    let parent = nix::unistd::getpid();
    // SAFETY: the closure runs between fork and exec and makes only async-signal-safe calls
    // (prctl, getppid); io::Error from an errno code does not allocate.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
            // The parent may have died between fork and prctl; then no signal would come.
            if nix::unistd::getppid() != parent {
                return Err(io::Error::from_raw_os_error(nix::libc::ESRCH));
            }
            Ok(())
        });
    }
    let (tx, rx) = mpsc::channel();
    spawner
        .send((cmd, tx))
        .map_err(|_| io::Error::other("the server-spawning thread is gone"))?;
    rx.recv_timeout(STARTUP_TIMEOUT)
        .map_err(|_| io::Error::other("the server-spawning thread did not answer"))?
}

/// A minimal HTTP/1.1 GET to 127.0.0.1 with bounded timeouts (no proxy settings apply).
pub fn http_get(endpoint: &str, path: &str) -> io::Result<(u16, String)> {
    let addr: SocketAddr = endpoint
        .strip_prefix("http://")
        .and_then(|a| a.parse().ok())
        .filter(|a: &SocketAddr| a.ip().is_loopback())
        .ok_or_else(|| io::Error::other(format!("not a loopback endpoint: {endpoint}")))?;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other(format!("no HTTP status in {head:?}")))?;
    Ok((status, body.to_owned()))
}
