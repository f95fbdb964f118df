# Written by trainvisor (shipped inside its binary; stdlib only). First on the PYTHONPATH of
# every Python rank the local launcher starts, it
#  - registers faulthandler for all threads on a real-time signal, writing to
#    TRAINVISOR_STACKS_FILE, and says so in that file with its pid and signal, so trainvisor can
#    take a hung rank's Python stacks before it kills it;
#  - observes an unchanged PyTorch script: once the script imports torch (never before, and
#    never importing it itself), a global optimizer step hook counts the steps and a daemon
#    thread posts them, with the loss, as the rank's heartbeats (TRAINVISOR_AUTO_HEARTBEAT=1);
#  - hands over to any other sitecustomize further down the path, as if it had not been there.


def _trainvisor_stacks():
    import os
    path = os.environ.get("TRAINVISOR_STACKS_FILE")
    if not path:
        return
    try:
        import faulthandler, signal
        sig = signal.SIGRTMIN + 2
        f = open(path, "a", buffering=1)
        faulthandler.register(sig, file=f, all_threads=True, chain=False)
        f.write("# trainvisor: faulthandler on signal %d in pid %d\n" % (sig, os.getpid()))
        f.flush()
        import sys
        sys._trainvisor_stacks_file = f
    except Exception:
        pass


class _TrainvisorObserver:
    """Steps of the first optimizer that steps, the last scalar `.backward()` was called on
    (the loss), and the step count at the script's last `torch.save`; a daemon thread posts
    them. The step hook only counts: all I/O happens on the thread."""

    TICK = 0.2

    def __init__(self):
        self.steps = 0
        self.optimizer = None
        self.loss = None
        self.saved_step = None
        self.stepped = False
        self.stopped = False
        self.exiting = False
        self.wake = None

    def on_step(self, optimizer, args, kwargs):
        if self.optimizer is None:
            self.optimizer = id(optimizer)
        elif id(optimizer) != self.optimizer:
            return
        self.steps += 1
        if not self.stepped:
            self.stepped = True
            self.start()

    def on_backward(self, tensor):
        try:
            if tensor.numel() == 1:
                self.loss = tensor
        except Exception:
            pass

    def on_save(self):
        if self.stepped:
            self.saved_step = self.steps
            if self.wake is not None:
                self.wake.set()

    def on_load(self):
        # A load before the first step is the script resuming from its checkpoint: it goes on
        # from the step that checkpoint was saved at (as the previous incarnations reported it).
        import os
        resume = os.environ.get("TRAINVISOR_RESUME_STEP", "")
        if not self.stepped and resume.isdigit():
            self.steps = int(resume)

    def start(self):
        # Read here, at the first step, not at import: a warm standby imports torch long
        # before it becomes a rank and gets that rank's environment.
        import os, threading
        if os.environ.get("TRAINVISOR_AUTO_HEARTBEAT") != "1":
            return
        url = os.environ.get("TRAINVISOR_HEARTBEAT_URL")
        token = os.environ.get("TRAINVISOR_TOKEN")
        if not url or not token:
            return
        try:
            timeout = float(os.environ.get("HEARTBEAT_TIMEOUT") or 10)
        except ValueError:
            timeout = 10.0
        self.wake = threading.Event()
        self.wake.set()  # the first step is reported at once: it says training (again)
        thread = threading.Thread(
            target=self.run,
            args=(url, token, max(0.05, min(1.0, timeout / 4))),
            name="trainvisor-heartbeat",
            daemon=True,
        )
        thread.start()
        import atexit
        atexit.register(self.at_exit, thread)

    def at_exit(self, thread):
        # The thread ends (with one last beat for the steps since the previous one) before the
        # interpreter is torn down: a daemon thread still inside torch then would abort it.
        self.exiting = True
        self.wake.set()
        thread.join(1.0)

    def body(self):
        import math
        body = {"step": self.steps, "trainvisor_auto": True}
        loss = self.loss
        if loss is not None:
            try:
                value = float(loss.item())
                if math.isfinite(value):
                    body["metrics"] = {"loss": value}
            except Exception:
                pass
        if self.saved_step is not None:
            body["saved_step"] = self.saved_step
        return body

    def run(self, url, token, interval):
        import http.client, time, urllib.parse
        parts = urllib.parse.urlsplit(url)
        path = parts.path + ("?" + parts.query if parts.query else "")
        kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        headers = {"Authorization": "Bearer " + token, "Content-Type": "application/json"}

        def connect(timeout=max(2.0, 2 * interval)):
            return kind(parts.hostname, parts.port, timeout=timeout)

        conn = connect()
        # New steps are sent within TICK (so a kill finds the last step known to within a
        # few steps), an unchanged count once per interval (the rank is alive).
        tick = min(self.TICK, interval)
        sent, sent_at = None, 0.0
        while True:
            self.wake.wait(tick)
            self.wake.clear()
            now, state = time.monotonic(), (self.steps, self.saved_step)
            if self.exiting:
                # The last steps of a script that ends between two beats; half a second at
                # most for a server that does not answer.
                if state != sent:
                    conn.close()
                    self.post(connect(0.5), path, headers)
                return
            if state == sent and now - sent_at < interval:
                continue
            sent, sent_at = state, now
            go_on = self.post(conn, path, headers)
            if go_on is None:
                conn.close()  # the server is away for a moment: a fresh connection next time
                conn = connect()
            elif not go_on:
                return

    def post(self, conn, path, headers):
        """True: go on; False: stop (a replaced incarnation or an ended job, or the script
        sends its own heartbeats, which win); None: the server did not answer."""
        import json
        if self.stopped:
            return False
        try:
            conn.request("POST", path, json.dumps(self.body()), headers)
            reply = conn.getresponse()
            text = reply.read()
        except Exception:
            return None
        # 4xx but "too many requests" or a timeout: this incarnation is no longer heard.
        refused = 400 <= reply.status < 500 and reply.status not in (408, 429)
        try:
            self.stopped = refused or bool(json.loads(text).get("ignored"))
        except Exception:
            self.stopped = refused
        return not self.stopped


def _trainvisor_attach(torch, observer):
    import functools
    import sys
    optim = sys.modules.get("torch.optim.optimizer")
    register = getattr(optim, "register_optimizer_step_post_hook", None)
    if register is None:
        return
    register(observer.on_step)

    backward = torch.Tensor.backward

    @functools.wraps(backward)
    def _backward(self, *args, **kwargs):
        observer.on_backward(self)
        return backward(self, *args, **kwargs)

    save, load = torch.save, torch.load

    @functools.wraps(save)
    def _save(*args, **kwargs):
        out = save(*args, **kwargs)
        observer.on_save()
        return out

    @functools.wraps(load)
    def _load(*args, **kwargs):
        out = load(*args, **kwargs)
        observer.on_load()
        return out

    torch.Tensor.backward = _backward
    torch.save, torch.load = _save, _load


class _TrainvisorTorchFinder:
    """On the script's `import torch`: torch is imported by the finders after this one, as
    without it, and the observer attached once torch's own initialisation is done."""

    def __init__(self, observer):
        self.observer = observer

    def find_spec(self, name, path=None, target=None):
        if name != "torch":
            return None
        import sys
        import importlib.util
        try:
            sys.meta_path.remove(self)
        except ValueError:
            pass
        spec = importlib.util.find_spec("torch")
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader, observer = spec.loader, self.observer

        class _Loader:
            def __getattr__(self, attr):
                return getattr(loader, attr)

            def create_module(self, spec):
                return loader.create_module(spec)

            def exec_module(self, module):
                # torch's own loader again, for anything that asks torch's spec later.
                spec.loader = module.__loader__ = loader
                loader.exec_module(module)
                try:
                    _trainvisor_attach(module, observer)
                except Exception:
                    pass

        spec.loader = _Loader()
        return spec


def _trainvisor_observe():
    import os, sys
    if os.environ.get("TRAINVISOR_AUTO_HEARTBEAT") != "1":
        return
    # Only the rank's own process: a Python process the script starts (multiprocessing's
    # spawn, a subprocess) inherits the environment, and its steps are not the rank's.
    mine = str(os.getpid())
    if os.environ.setdefault("TRAINVISOR_HOOK_PID", mine) != mine:
        return
    observer = _TrainvisorObserver()
    sys._trainvisor_observer = observer
    if "torch" in sys.modules:
        _trainvisor_attach(sys.modules["torch"], observer)
    else:
        sys.meta_path.insert(0, _TrainvisorTorchFinder(observer))


def _trainvisor_chain():
    import importlib, os, sys
    here = os.path.dirname(os.path.abspath(__file__))
    mine = sys.modules.pop("sitecustomize", None)
    saved = list(sys.path)
    try:
        sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
        importlib.import_module("sitecustomize")
    except ImportError:
        if mine is not None:
            sys.modules["sitecustomize"] = mine
    finally:
        sys.path[:] = saved


_trainvisor_stacks()
_trainvisor_observe()
_trainvisor_chain()
