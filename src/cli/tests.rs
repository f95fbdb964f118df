//! The command line's own checks: help on every flag, every `serve` flag in the README.

use clap::CommandFactory;

/// `--help` explains every flag and argument of every command (issue 29, point 4).
#[test]
fn every_flag_and_argument_has_help() {
    let cli = super::Cli::command();
    let mut missing = Vec::new();
    for sub in cli.get_subcommands() {
        for arg in sub.get_arguments() {
            let id = arg.get_id().as_str();
            if ["help", "version"].contains(&id) {
                continue;
            }
            if arg
                .get_help()
                .is_none_or(|h| h.to_string().trim().is_empty())
            {
                missing.push(format!("{} {id}", sub.get_name()));
            }
        }
    }
    assert!(missing.is_empty(), "no help text: {missing:?}");
}

/// The README's configuration table lists every flag of `serve`, with its variable.
#[test]
fn the_readme_configuration_table_has_every_serve_flag() {
    let readme = include_str!("../../README.md");
    let start = readme.find("## Configuration").expect("the section");
    let table: Vec<&str> = readme[start..]
        .lines()
        .skip_while(|l| !l.starts_with("| flag"))
        .take_while(|l| l.starts_with('|'))
        .collect();
    let cli = super::Cli::command();
    cli.clone().debug_assert();
    let serve = cli.find_subcommand("serve").expect("serve");
    for arg in serve.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if long == "help" {
            continue;
        }
        let row = table
            .iter()
            .find(|r| r.starts_with(&format!("| `--{long}`")))
            .unwrap_or_else(|| panic!("--{long} is missing from the README's table"));
        if let Some(env) = arg.get_env() {
            let env = env.to_string_lossy();
            assert!(
                row.contains(&format!("`{env}`")),
                "--{long}: {env} not in {row}"
            );
        }
    }
}

/// `bench --help` names every scenario `--only` takes.
#[test]
fn the_bench_only_help_names_every_scenario() {
    let mut cli = super::Cli::command();
    let help = cli
        .find_subcommand_mut("bench")
        .expect("a bench subcommand")
        .render_long_help()
        .to_string();
    for name in crate::bench::SCENARIOS {
        assert!(help.contains(name), "{name} is missing from: {help}");
    }
}
