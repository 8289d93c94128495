"""The firewall's dead-man switch on a real (slow) host: an apply that outlives its dead-man
timer must not report success. Found on the VM host: under TCG the baseline apply takes longer
than the 30 s it used to allow, the timer undid the rules, and `dn host up` reported success
with INPUT open."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.vm


def test_an_apply_whose_dead_man_fired_fails_and_a_rerun_converges(vm_host):
    from dn.errors import DnError
    from dn.host import firewall as fw
    from dn.models import HostBaseline

    host = HostBaseline.from_settings(_settings(vm_host))
    with vm_host.session() as s:
        fw.remove_baseline(s, host)
        # a dead-man shorter than the apply: it fires while dn is still validating/applying
        with pytest.raises(DnError, match="dead-man"):
            fw.converge_baseline(s, host, deadman=0.5)
        done = fw.converge_baseline(s, host)  # enough time: applied and confirmed
        assert done is not None
        rules = s.run(["iptables", "-S", "INPUT"]).text
        assert "-P INPUT DROP" in rules, rules
        assert fw.plan(fw.baseline_rulesets(host), fw.read(s), name="baseline", where=s.where).empty
        fw.remove_baseline(s, host)
        assert "-P INPUT ACCEPT" in s.run(["iptables", "-S", "INPUT"]).text


def _settings(vm_host):
    from pathlib import Path

    from dn import vm
    from dn.config import Settings

    data_dir = Path(vm_host.data_dir)
    return Settings.model_validate({"data_dir": str(data_dir), "default_host": vm.HOST_NAME,
                                    "hosts": {vm.HOST_NAME: vm.host_entry(vm.ClientFiles.of(data_dir))}})
