"""The VM sandbox host's pure parts: recipe and its hash, QEMU argv, guest files, known_hosts,
the configuration file it writes."""
from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from dn import vm
from dn.config import Settings, load_settings

DEB822 = """Types: deb
URIs: http://mirror.example.eu/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example.eu/debian-security
Suites: bookworm-security
Components: main
"""


@pytest.mark.parametrize("sources, mirror", [
    ([DEB822], "http://mirror.example.eu/debian"),
    (["deb http://ftp.cz.debian.org/debian/ bookworm main contrib\n"], "http://ftp.cz.debian.org/debian"),
    (["deb [arch=amd64] https://packages.cloud.google.com/apt cloud-sdk-bookworm main\n",
      "deb [signed-by=/k.gpg] http://m.example/debian bookworm main\n"], "http://m.example/debian"),
    (["# deb http://commented.example/debian bookworm main\n"], vm.DEFAULT_MIRROR),
    ([], vm.DEFAULT_MIRROR),
])
def test_apt_mirror(sources, mirror):
    assert vm.apt_mirror(sources) == mirror


def test_requirements_are_the_runtime_closure_of_dn():
    requires = {
        "dn": ["typer>=0.28,<0.29", "psycopg[binary]>=3.1", "hypothesis; extra == 'test'", "missing-here>=1"],
        "typer": ["click>=8", "rich>=10 ; extra == \"all\"", "Typing_Extensions>=4"],
        "psycopg": ["psycopg-binary==3.3.9; extra == 'binary'", "psycopg-c; extra == 'c'",
                    "typing-extensions>=4.6"],
        "click": [], "psycopg-binary": None, "typing-extensions": [],
    }
    versions = {"typer": "0.28.0", "psycopg": "3.3.9", "psycopg-binary": "3.3.9", "click": "8.1.7",
                "typing-extensions": "4.12.0", "hypothesis": "6.1", "rich": "13", "psycopg-c": "3.3.9", "dn": "0.1.0"}
    got = vm.requirements("dn", requires.get, versions.get)
    # test extras, typer's [all] and psycopg's [c] are not asked for; an uninstalled one is skipped
    assert got == ("click==8.1.7", "psycopg==3.3.9", "psycopg-binary==3.3.9", "typer==0.28.0",
                   "typing-extensions==4.12.0")


def test_installed_requirements_pin_what_dn_runs_with():
    from importlib import metadata

    got = dict(r.split("==") for r in vm.installed_requirements())
    for dist in ("paramiko", "pydantic", "typer", "pulumi", "psycopg"):
        assert got[dist] == metadata.version(dist)
    assert "pytest" not in got and "dn" not in got


def test_recipe_digest_is_stable_and_changes_with_the_recipe():
    a = vm.recipe("http://deb.debian.org/debian", ["paramiko==3.5.0"])
    assert a.digest == vm.recipe("http://deb.debian.org/debian", ["paramiko==3.5.0"]).digest
    assert len(a.key) == 16 and a.digest.startswith(a.key)
    changed = {
        "python pin": vm.recipe("http://deb.debian.org/debian", ["paramiko==3.5.1"]),
        "mirror (sources.list in the image)": vm.recipe("http://m.example/debian", ["paramiko==3.5.0"]),
        "package list": vm.Recipe(**{**a.__dict__, "packages": (*a.packages, "nmap")}),
        "kernel": vm.Recipe(**{**a.__dict__, "kernel": ("linux-image-amd64", "initramfs-tools")}),
        "size": vm.Recipe(**{**a.__dict__, "size_mb": a.size_mb + 1}),
        "build procedure version": vm.Recipe(**{**a.__dict__, "version": a.version + 1}),
    }
    for what, other in changed.items():
        assert other.digest != a.digest, what


def test_the_package_list_has_what_a_production_host_runs():
    for p in ("systemd", "systemd-sysv", "udev", "kmod", "openssh-server", "cryptsetup", "iproute2", "e2fsprogs",
              "docker.io", "nginx", "iptables", "postgresql", "python3"):
        assert p in vm.PACKAGES
    assert vm.KERNEL_PACKAGES == ("linux-image-cloud-amd64", "initramfs-tools")


def test_networkd_unit_is_static_without_gateway():
    text = vm.networkd_unit()
    assert f"MACAddress={vm.GUEST_MAC}" in text
    assert "Address=10.231.9.2/24" in text
    assert "Gateway" not in text and "DHCP" not in text


def test_guest_files_pin_one_host_key_and_key_only_root_login():
    files = vm.guest_files("http://deb.debian.org/debian")
    sshd = files["/etc/ssh/sshd_config.d/10-dn.conf"]
    assert "HostKey /etc/ssh/ssh_host_ed25519_key" in sshd
    assert "PermitRootLogin prohibit-password" in sshd and "PasswordAuthentication no" in sshd
    assert files["/etc/fstab"].startswith("/dev/vda / ext4")
    assert "deb http://deb.debian.org/debian bookworm main" in files["/etc/apt/sources.list"]


IMG = vm.Image(Path("/cache/vm/abc"))
RUN = vm.Run(Path("/srv/dn-vm"))


def _opt(argv, flag):
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_qemu_argv_tcg():
    argv = vm.qemu_argv(IMG, RUN, "tcg")
    assert argv[0] == "qemu-system-x86_64"
    assert _opt(argv, "-accel") == ["tcg,thread=multi"] and _opt(argv, "-cpu") == ["max"]
    assert _opt(argv, "-smp") == ["2"] and _opt(argv, "-m") == ["2048"]
    assert _opt(argv, "-kernel") == ["/cache/vm/abc/vmlinuz"] and _opt(argv, "-initrd") == ["/cache/vm/abc/initrd.img"]
    assert "root=/dev/vda" in _opt(argv, "-append")[0]
    # the VM writes its overlay, never the cached image
    assert _opt(argv, "-drive") == ["file=/srv/dn-vm/disk.qcow2,if=virtio,format=qcow2,cache=writeback,discard=unmap"]
    assert "tap,id=n0,ifname=dn-vm0,script=no,downscript=no" in _opt(argv, "-netdev")
    assert f"virtio-net-pci,netdev=n0,mac={vm.GUEST_MAC}" in _opt(argv, "-device")
    assert _opt(argv, "-pidfile") == ["/srv/dn-vm/qemu.pid"] and "-daemonize" in argv
    assert "-no-reboot" not in argv  # a guest reboot stays a reboot


def test_qemu_argv_kvm_and_bad_accel():
    argv = vm.qemu_argv(IMG, RUN, "kvm")
    assert _opt(argv, "-accel") == ["kvm"] and _opt(argv, "-cpu") == ["host"]
    with pytest.raises(ValueError, match="kvm or tcg"):
        vm.qemu_argv(IMG, RUN, "hvf")


def test_probe_boots_the_kernel_alone_and_exits():
    argv = vm.probe_argv(IMG)
    assert _opt(argv, "-accel") == ["kvm"] and "-no-reboot" in argv and "-drive" not in argv
    assert "panic=-1" in _opt(argv, "-append")[0]


def test_overlay_is_backed_by_the_raw_image():
    assert vm.overlay_argv(IMG, RUN) == ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
                                         "/cache/vm/abc/rootfs.raw", "/srv/dn-vm/disk.qcow2"]


def test_known_hosts_line():
    pub = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB4bX root@dn-vm\n"
    assert vm.known_hosts_line(pub) == "10.231.9.2 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB4bX\n"
    for bad in ("", "ssh-rsa AAAA", "ssh-ed25519"):
        with pytest.raises(ValueError):
            vm.known_hosts_line(bad)


def test_config_file_points_dn_at_the_vm_host_with_the_production_layout(tmp_path):
    text = vm.to_toml(vm.vm_config(tmp_path))
    data = tomllib.loads(text)
    assert data["default_host"] == vm.HOST_NAME
    h = data["hosts"][vm.HOST_NAME]
    assert h["prefix"] == "/" and h["address"] == "10.231.9.2" and h["admin_sources"] == ["10.231.9.1/32"]
    assert h["known_hosts"] == str(tmp_path / "vm" / "known_hosts")
    assert "sandbox-eu1" in data["hosts"]  # the netns host stays configured
    cfg = tmp_path / "config.toml"
    cfg.write_text(text)
    s = load_settings(cfg, environ={"DN_HOME": str(tmp_path)})
    assert isinstance(s, Settings)
    assert s.default_host == vm.HOST_NAME and s.host().prefix == "/" and s.host().path("/etc/nginx") == "/etc/nginx"


def test_to_toml_quotes_names_that_need_it():
    data = tomllib.loads(vm.to_toml({"a": {"b.c": {"x": 1, "y": ["p", "q"], "z": True}}, "top": "v\"q"}))
    assert data == {"a": {"b.c": {"x": 1, "y": ["p", "q"], "z": True}}, "top": 'v"q'}


def test_dn_tree_is_reproducible_and_holds_dn(tmp_path):
    (tmp_path / "dn").mkdir()
    (tmp_path / "dn" / "x.py").write_text("x = 1\n")
    (tmp_path / "dn" / "__pycache__").mkdir()
    (tmp_path / "dn" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"junk")
    for d in vm.DN_TREE:
        if d != "dn" and not d.endswith(".toml"):
            (tmp_path / d).mkdir()
    (tmp_path / "pyproject.toml").write_text("[project]\n")
    data, digest = vm.dn_tree(tmp_path)
    assert vm.dn_tree(tmp_path) == (data, digest)
    import io
    import tarfile

    names = tarfile.open(fileobj=io.BytesIO(data)).getnames()
    assert names == ["dn/x.py", "pyproject.toml"]
    (tmp_path / "dn" / "x.py").write_text("x = 2\n")
    assert vm.dn_tree(tmp_path)[1] != digest


def test_launcher_runs_dn_with_the_venv_python():
    text = vm.dn_launcher()
    assert text.startswith(f"#!{vm.VENV}/bin/python3\n") and "from cli.main import run" in text
