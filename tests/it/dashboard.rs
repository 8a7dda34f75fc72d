//! The web dashboard in a real browser: headless Chromium driven through chromedriver
//! (`fantoccini`) against an engine served on loopback. Logs in (a wrong token first), follows
//! a live deployment's node cells until all are completed, sees a node's log line, and
//! terminates another deployment through the Terminate button and its confirmation. A
//! screenshot of each page goes to `target/screenshots/`.
//!
//! Needs `chromium` and `chromedriver` (Debian's `chromium`, `chromium-driver`; paths from
//! `TASKFLY_CHROMIUM` and `TASKFLY_CHROMEDRIVER`, else found on `PATH`). With
//! `TASKFLY_REQUIRE_CHROMIUM=1` (scripts/test.sh sets it) their absence fails the test;
//! without it the test is skipped, saying why.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{json, Value};
use taskfly::wire::DeploymentStatus;

use crate::support::cli_daemon::free_port;
use crate::support::{local_yml, Project, TestEngine, API_TOKEN};

/// Longest wait for anything the page should show.
const LIMIT: Duration = Duration::from_secs(60);

/// How often the page is asked again while waiting for it to show something.
const POLL: Duration = Duration::from_millis(100);

/// Nodes of the deployment followed in the grid.
const NODES: usize = 24;

/// chromedriver, started in a process group of its own so the Chromium it starts goes with it.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let group = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// The program named by `variable`, else `name` on `PATH`.
fn program(variable: &str, name: &str) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(variable) {
        return Some(PathBuf::from(path));
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
}

/// chromium and chromedriver, or `None` (test skipped) when they are missing and not required.
fn browser() -> Option<(PathBuf, PathBuf)> {
    let required = std::env::var("TASKFLY_REQUIRE_CHROMIUM").is_ok_and(|v| v == "1");
    let found = (
        program("TASKFLY_CHROMIUM", "chromium"),
        program("TASKFLY_CHROMEDRIVER", "chromedriver"),
    );
    match found {
        (Some(chromium), Some(driver)) => Some((chromium, driver)),
        _ if required => panic!(
            "TASKFLY_REQUIRE_CHROMIUM=1 but chromium or chromedriver is missing (found {found:?}); \
             install Debian's chromium and chromium-driver (scripts/test-chromium.sh)"
        ),
        _ => {
            eprintln!(
                "skipped: chromium and chromedriver are needed (found {found:?}); \
                 scripts/test.sh installs them"
            );
            None
        }
    }
}

async fn start_driver(program: &Path) -> Driver {
    use std::os::unix::process::CommandExt;
    let port = free_port();
    let child = Command::new(program)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
    let driver = Driver {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    let status = format!("{}/status", driver.url);
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        // Asked only once it listens (the raw request fails the test on a refused connection).
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            let answer = crate::support::engine_http::raw_get(&driver.url, "/status", None).await;
            if answer.status == 200 && answer.json()["value"]["ready"] == true {
                return driver;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "chromedriver did not answer {status} within {LIMIT:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// A page being driven, with the place its screenshots go.
struct Browser {
    client: fantoccini::Client,
    screenshots: PathBuf,
}

impl Browser {
    async fn open(driver: &Driver, chromium: &Path, profile: &Path) -> Browser {
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".to_owned(),
            json!({
                "binary": chromium,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--window-size=1280,1000",
                    format!("--user-data-dir={}", profile.display()),
                ],
            }),
        );
        capabilities.insert("unhandledPromptBehavior".to_owned(), json!("ignore"));
        let client = ClientBuilder::new(HttpConnector::new())
            .capabilities(capabilities)
            .connect(&driver.url)
            .await
            .expect("a Chromium session");
        let screenshots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("../screenshots");
        std::fs::create_dir_all(&screenshots).expect("screenshot folder");
        Browser {
            client,
            screenshots,
        }
    }

    async fn run(&self, script: &str) -> Value {
        self.client
            .execute(script, Vec::new())
            .await
            .unwrap_or_else(|e| panic!("script failed ({e}): {script}"))
    }

    /// Asks the page `script` until it returns `true`; fails after [`LIMIT`] with what the
    /// page showed.
    async fn until(&self, what: &str, script: &str) {
        let deadline = tokio::time::Instant::now() + LIMIT;
        while self.run(script).await != Value::Bool(true) {
            if tokio::time::Instant::now() > deadline {
                let text = self.run("return document.body.innerText").await;
                self.screenshot("failure").await;
                panic!("the page did not show {what} within {LIMIT:?}; it shows:\n{text}");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn type_into(&self, css: &str, text: &str) {
        let field = self.client.find(Locator::Css(css)).await.expect(css);
        field.clear().await.expect("clear");
        field.send_keys(text).await.expect("type");
    }

    async fn click(&self, css: &str) {
        let element = self.client.find(Locator::Css(css)).await.expect(css);
        element.click().await.expect("click");
    }

    async fn screenshot(&self, name: &str) {
        let png = self.client.screenshot().await.expect("screenshot");
        std::fs::write(self.screenshots.join(format!("{name}.png")), png).expect("write png");
    }
}

/// The state each node's grid cell shows, read back from the canvas's pixels and the
/// page's colour for each state.
const CELL_STATES: &str = r#"
const context = document.getElementById('grid').getContext('2d');
const ratio = window.devicePixelRatio || 1;
const byColour = {};
for (const [state, colour] of Object.entries(colors)) {
  context.save(); context.fillStyle = colour; const hex = context.fillStyle; context.restore();
  byColour[hex] = state;
}
const hex = (d) => '#' + [d[0], d[1], d[2]].map((v) => v.toString(16).padStart(2, '0')).join('');
return page.nodes.map((n, i) => {
  const x = (i % grid.cols) * grid.cell + 2, y = Math.floor(i / grid.cols) * grid.cell + 2;
  return byColour[hex(context.getImageData(x * ratio, y * ratio, 1, 1).data)] || 'unknown';
});
"#;

/// A script that answers whether every cell shows `state`.
fn all_cells(state: &str) -> String {
    format!(
        "const states = (() => {{ {CELL_STATES} }})(); \
         return states.length === {NODES} && states.every((s) => s === '{state}');"
    )
}

fn gated(count: usize, gate: &Path) -> Project {
    Project::new(&local_yml(
        count as u32,
        &format!("global_metadata: {{gate: {}}}", gate.display()),
    ))
    .script(
        "#!/bin/sh\necho \"hello from node $TASKFLY_NODE_INDEX\"\n\
         while [ ! -e \"$GATE\" ]; do sleep 0.1; done\necho done\n",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_follows_a_deployment_live_and_terminates_one() {
    let Some((chromium, chromedriver)) = browser() else {
        return;
    };
    let engine = TestEngine::start().await;
    let gates = tempfile::tempdir().expect("temp dir");
    let (gate, never) = (gates.path().join("go"), gates.path().join("never"));
    let followed = gated(NODES, &gate);
    let id = engine.deploy(followed.path()).await;

    let driver = start_driver(&chromedriver).await;
    let profile = tempfile::tempdir().expect("profile dir");
    let browser = Browser::open(&driver, &chromium, profile.path()).await;

    // Login: a wrong token is refused with a message; the right one shows the list.
    browser
        .client
        .goto(&format!("{}/", engine.url))
        .await
        .expect("open the dashboard");
    browser
        .until(
            "the login form",
            "return !document.getElementById('login-page').hidden",
        )
        .await;
    browser.type_into("#token", "not-the-token").await;
    browser.click("#login-form button").await;
    browser
        .until(
            "that the token was refused",
            "return document.getElementById('login-message').textContent.includes('401')",
        )
        .await;
    browser.screenshot("login").await;
    browser.type_into("#token", API_TOKEN).await;
    browser.click("#login-form button").await;
    browser
        .until(
            "the deployment in the list",
            &format!("return !!document.querySelector('#deployments a[href=\"#/d/{id}\"]')"),
        )
        .await;
    let stored = browser
        .run("return sessionStorage.getItem('taskfly.token')")
        .await;
    assert_eq!(stored, json!(API_TOKEN));

    // The deployment: every cell reaches running_script, a log line shows, then every cell
    // turns completed as the nodes finish, with no reload of the page.
    browser
        .click(&format!("#deployments a[href=\"#/d/{id}\"]"))
        .await;
    browser
        .until("every node running", &all_cells("running_script"))
        .await;
    browser.run("window.notReloaded = true; return true").await;
    browser
        .until(
            "node 3's log line",
            "return document.getElementById('logs').textContent.includes('hello from node 3')",
        )
        .await;
    browser.screenshot("deployment-running").await;
    std::fs::write(&gate, "").expect("open the gate");
    browser
        .until("every node completed", &all_cells("completed"))
        .await;
    browser
        .until(
            "the deployment completed",
            "return document.getElementById('dep-status').textContent === 'completed'",
        )
        .await;
    assert_eq!(
        browser.run("return window.notReloaded === true").await,
        json!(true)
    );
    browser.screenshot("deployment-completed").await;

    // A cleanup reaches the open page as an event: the summary says the files are gone.
    engine.engine.cleanup(&id).await.expect("clean up");
    browser
        .until(
            "the cleanup in the summary",
            "return document.getElementById('dep-summary').textContent.includes('files cleaned up')",
        )
        .await;
    assert_eq!(
        browser.run("return window.notReloaded === true").await,
        json!(true)
    );

    // Terminate through the button and its confirmation.
    let doomed = gated(3, &never);
    let doomed_id = engine.deploy(doomed.path()).await;
    browser
        .client
        .goto(&format!("{}/#/d/{doomed_id}", engine.url))
        .await
        .expect("open the deployment");
    browser
        .until(
            "the deployment running",
            "return document.getElementById('dep-status').textContent === 'running' \
             && !document.getElementById('terminate').disabled",
        )
        .await;
    browser.click("#terminate").await;
    let question = browser
        .client
        .get_alert_text()
        .await
        .expect("a confirmation");
    assert!(question.contains(&doomed_id), "{question}");
    browser.client.accept_alert().await.expect("confirm");
    browser
        .until(
            "the deployment terminated",
            "return document.getElementById('dep-status').textContent === 'terminated'",
        )
        .await;
    browser.screenshot("deployment-terminated").await;
    let summary = engine.engine.summary(&doomed_id).await.expect("summary");
    assert_eq!(summary.status, DeploymentStatus::Terminated);

    // The list, with both.
    browser
        .client
        .goto(&format!("{}/#/", engine.url))
        .await
        .expect("open the list");
    browser
        .until(
            "both deployments listed",
            "return document.querySelectorAll('#deployments tbody tr').length === 2",
        )
        .await;
    browser.screenshot("list").await;

    // A token the daemon no longer accepts sends the page back to the login form.
    browser
        .run("sessionStorage.setItem('taskfly.token', 'revoked'); location.hash = '#/d/x'; return true")
        .await;
    browser
        .until(
            "the login form after a 401",
            "return !document.getElementById('login-page').hidden \
             && document.getElementById('login-message').textContent.includes('401')",
        )
        .await;

    browser.client.close().await.expect("close the session");
    drop(driver);
    engine.stop().await;
}
