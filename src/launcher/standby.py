# trainvisor warm standby (shipped inside the trainvisor binary; stdlib only).
#
# Started as `python [the rank's interpreter options] -c <this program> <preload module>...`
# with the rank's environment. It imports the preload modules, prints the ready line on
# stdout, and waits for one activation line (JSON) on stdin. Then it becomes the rank:
# environment, working directory, stdin (/dev/null), sys.argv and sys.path[0] as
# `python script.py args` or `python -m module args` would have them, and runs the script as
# __main__ in this process (same pid, process group, pipes and signal dispositions).
# If stdin closes without an activation line, it exits 0 without a word.


def _trainvisor_standby():
    import os
    import sys

    for name in sys.argv[1:]:
        __import__(name)
    sys.stdout.flush()
    sys.stderr.flush()
    os.write(1, b"\x1etrainvisor-standby-ready\n")

    import json

    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(0, 1 << 16)
        if not chunk:
            os._exit(0)
        data += chunk
    msg = json.loads(data.decode("utf-8"))

    # As a cold rank: stdin is /dev/null.
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    for key in msg.get("unset", []):
        os.environ.pop(key, None)
    os.environ.update(msg["env"])
    if msg.get("cwd"):
        os.chdir(msg["cwd"])

    # The stacks hook (trainvisor's sitecustomize) registered faulthandler for the file of the
    # incarnation this standby was started beside: point it at this incarnation's.
    old = getattr(sys, "_trainvisor_stacks_file", None)
    path = os.environ.get("TRAINVISOR_STACKS_FILE")
    if old is not None and path:
        try:
            import faulthandler
            import signal

            sig = signal.SIGRTMIN + 2
            f = open(path, "a", buffering=1)
            faulthandler.register(sig, file=f, all_threads=True, chain=False)
            f.write("# trainvisor: faulthandler on signal %d in pid %d\n" % (sig, os.getpid()))
            sys._trainvisor_stacks_file = f
            old.close()
        except Exception:
            pass
    return msg


def _trainvisor_run(msg):
    import builtins
    import os
    import sys

    main = sys.modules["__main__"]
    run_main = _trainvisor_main
    for name in ("_trainvisor_standby", "_trainvisor_run", "_trainvisor_main"):
        main.__dict__.pop(name, None)
    if msg.get("module"):
        import runpy

        sys.argv[:] = ["-m"] + list(msg["argv"])
        sys.path[0] = os.getcwd()
        run_main(runpy._run_module_as_main, msg["module"], alter_argv=True)
        return

    script = msg["script"]
    sys.argv[:] = [script] + list(msg["argv"])
    full = os.path.abspath(script)
    sys.path[0] = os.path.dirname(os.path.realpath(script))
    from importlib.machinery import SourceFileLoader

    try:
        with open(full, "rb") as f:
            source = f.read()
    except OSError as e:
        # As `python missing.py` says it, with its exit code.
        sys.stderr.write(
            "%s: can't open file %r: [Errno %d] %s\n"
            % (sys.orig_argv[0], full, e.errno, e.strerror)
        )
        sys.exit(2)
    code = compile(source, full, "exec", dont_inherit=True)
    # The script runs in the real __main__ module, as `python script.py` runs it.
    g = main.__dict__
    g.clear()
    g.update(
        __name__="__main__",
        __annotations__={},
        __doc__=None,
        __package__=None,
        __loader__=SourceFileLoader("__main__", full),
        __spec__=None,
        __builtins__=builtins,
        __file__=full,
        __cached__=None,
    )
    run_main(exec, code, g)


def _trainvisor_main(run, *args, **kwargs):
    import sys

    try:
        run(*args, **kwargs)
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as e:
        # Printed as Python prints an uncaught exception, without this frame; exit code 1.
        tb = e.__traceback__.tb_next if e.__traceback__ is not None else None
        sys.excepthook(type(e), e.with_traceback(tb), tb)
        del e, tb
        sys.exit(1)


_trainvisor_run(_trainvisor_standby())
