//! A rank's command as Python runs it: the interpreter with its options, and either a script
//! (`python train.py args`) or a module (`python -m pkg.train args`). Warm standby ranks need
//! this split: a standby starts the interpreter (with the same options) ahead of time and is
//! told the script, or the module, and its arguments when it becomes the rank.

/// What `python …` runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PythonMain {
    Script(String),
    Module(String),
}

/// A command split the way CPython reads its command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PythonCommand {
    /// The interpreter and its options, up to (not including) the script or `-m`.
    pub interpreter: Vec<String>,
    pub main: PythonMain,
    /// The script's or module's own arguments (`sys.argv[1:]`).
    pub args: Vec<String>,
}

/// A dotted Python module name, such as `torch` or `pkg.train`.
pub fn is_module_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && name.split('.').all(|part| {
            part.chars()
                .next()
                .is_some_and(|c| c == '_' || c.is_alphabetic())
                && part.chars().all(|c| c == '_' || c.is_alphanumeric())
        })
}

/// Interpreter options that take no value (they may be combined: `-uB`).
const FLAGS: &str = "bBdEhiIOPqsSuvVx";

impl PythonCommand {
    /// Splits `argv` when its program is a Python interpreter (`python`, `python3`,
    /// `python3.11`, a path to one) running a script or a module; otherwise says why not.
    pub fn parse(argv: &[String]) -> Result<PythonCommand, String> {
        let Some(program) = argv.first() else {
            return Err("the command is empty".into());
        };
        let base = program.rsplit('/').next().unwrap_or(program);
        let is_python = base
            .strip_prefix("python")
            .is_some_and(|v| v.chars().all(|c| c.is_ascii_digit() || c == '.'));
        if !is_python {
            return Err(format!(
                "its program {program:?} is not a Python interpreter (python, python3, …)"
            ));
        }
        let mut i = 1;
        while i < argv.len() {
            let arg = &argv[i];
            let rest = |at: usize| argv[at..].to_vec();
            if arg == "-m" || (arg.starts_with("-m") && arg.len() > 2) {
                let (module, next) = if arg == "-m" {
                    match argv.get(i + 1) {
                        Some(m) => (m.clone(), i + 2),
                        None => return Err("-m names no module".into()),
                    }
                } else {
                    (arg[2..].to_string(), i + 1)
                };
                if !is_module_name(&module) {
                    return Err(format!("-m {module:?} is not a module name"));
                }
                return Ok(PythonCommand {
                    interpreter: argv[..i].to_vec(),
                    main: PythonMain::Module(module),
                    args: rest(next),
                });
            }
            if arg == "-" || arg == "-c" || (arg.starts_with("-c") && !arg.starts_with("--")) {
                return Err(format!(
                    "{arg} runs code from the command line or stdin, not a script or module"
                ));
            }
            if arg == "-W" || arg == "-X" || arg == "--check-hash-based-pycs" {
                i += 2;
                continue;
            }
            if arg.starts_with("-W") || arg.starts_with("-X") {
                i += 1;
                continue;
            }
            if let Some(flags) = arg.strip_prefix('-') {
                if flags.starts_with('-') || !flags.chars().all(|c| FLAGS.contains(c)) {
                    return Err(format!("the interpreter option {arg} is not supported"));
                }
                if flags.contains('i') {
                    return Err("-i (interactive) is not supported".into());
                }
                i += 1;
                continue;
            }
            return Ok(PythonCommand {
                interpreter: argv[..i].to_vec(),
                main: PythonMain::Script(arg.clone()),
                args: rest(i + 1),
            });
        }
        Err("it names no script and no -m module".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        s.split(' ').map(String::from).collect()
    }

    #[test]
    fn scripts_and_modules_are_split_from_the_interpreter_options() {
        let c =
            PythonCommand::parse(&argv("python3 -u -X dev -W ignore train.py --lr 0.1")).unwrap();
        assert_eq!(c.interpreter, argv("python3 -u -X dev -W ignore"));
        assert_eq!(c.main, PythonMain::Script("train.py".into()));
        assert_eq!(c.args, argv("--lr 0.1"));

        let c = PythonCommand::parse(&argv("/venv/bin/python3.11 -uB -m pkg.train -m x")).unwrap();
        assert_eq!(c.interpreter, argv("/venv/bin/python3.11 -uB"));
        assert_eq!(c.main, PythonMain::Module("pkg.train".into()));
        assert_eq!(c.args, argv("-m x"));

        let c = PythonCommand::parse(&argv("python -mpkg")).unwrap();
        assert_eq!(c.main, PythonMain::Module("pkg".into()));
        assert!(c.args.is_empty());
    }

    #[test]
    fn what_is_not_a_python_script_or_module_is_refused() {
        for bad in [
            "bash train.sh",
            "pythonista x.py",
            "python",
            "python -u",
            "python -c print(1)",
            "python - x",
            "python -i x.py",
            "python --help",
            "python -m",
            "python -m 1bad",
        ] {
            assert!(PythonCommand::parse(&argv(bad)).is_err(), "{bad}");
        }
    }
}
