//! Records the commit the binary is built from, for `--version` (and anything else that
//! reports the build): the `CORECAST_COMMIT` environment variable when it is set and not
//! blank (set it when building from a tarball or an sdist, which carry no `.git`), else
//! `git rev-parse --short HEAD` when building inside a git checkout, else `unknown`.
//! Exposed as `env!("CORECAST_COMMIT")`.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=CORECAST_COMMIT");
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    };
    let from_env = std::env::var("CORECAST_COMMIT").ok().filter(|c| !c.trim().is_empty());
    let commit = from_env.or_else(|| git(&["rev-parse", "--short", "HEAD"]));
    // Rebuild when HEAD moves (a commit, a checkout); a worktree keeps these files in its
    // own git directory, which `--git-path` finds.
    for file in ["HEAD", "logs/HEAD"] {
        if let Some(path) = git(&["rev-parse", "--git-path", file]) {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    println!(
        "cargo:rustc-env=CORECAST_COMMIT={}",
        commit.as_deref().unwrap_or("unknown")
    );
}
