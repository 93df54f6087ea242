"""The `vm` marker, and a summary of the VM runs at the end of the pytest output.

The summary shows per kernel the Debian package, the load path the tracer
chose, the timings and the outcome, without -s or -rP: the console logs
themselves stay captured and appear only for a failing kernel.
"""

_vm_reports = []


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "vm: boots Debian kernels under qemu (TCG) to run runqlat in a guest")


def pytest_runtest_logreport(report):
    props = dict(report.user_properties)
    if report.when == "call" and "vm_package" in props:
        _vm_reports.append((report.nodeid, report.outcome, props))


def pytest_terminal_summary(terminalreporter):
    if not _vm_reports:
        return
    terminalreporter.section("VM kernels")
    for nodeid, outcome, p in _vm_reports:
        terminalreporter.write_line(
            f"{nodeid.rsplit('[', 1)[-1].rstrip(']'):>5}  {outcome:<7} "
            f"{p.get('vm_package', '?')}  load path: {p.get('vm_load_path', '?')}  "
            f"guest exit {p.get('vm_guest_exit', '?')}  ({p.get('vm_timing', '?')})")
