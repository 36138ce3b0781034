package mcp.file_test

import data.mcp.file

_input(roles, action, f) := {
	"version": 1,
	"action": action,
	"subject": {"id": "alice", "roles": roles, "auth": "token"},
	"file": f,
}

_read(roles, path) := _input(roles, "file.read", {"path": path})

test_operation if {
	file.operation == "read" with input as _read(["developer"], "a")
	file.operation == "list" with input.action as "file.list"
	not file.operation with input.action as "file.chmod"
	not file.operation with input.action as "command.execute"
	not file.operation with input.action as 7
}

test_path_is_normalised if {
	file.path == "src/a.txt" with input as _read(["developer"], "./src//a.txt")
	file.path == "" with input as _read(["developer"], ".")
}

test_reads_allowed if {
	every c in [["readonly", "src/a.txt"], ["agent", "README.md"], ["developer", "."], ["admin", ""]] {
		file.allow with input as _read([c[0]], c[1])
		count(file.deny) == 0 with input as _read([c[0]], c[1])
	}
}

test_write_prefixes if {
	every c in [
		["agent", "src/a.py", true], ["agent", "src", true], ["agent", "tests/t.py", true],
		["agent", "README.md", false], ["agent", "srcx/a", false], ["developer", "README.md", true],
		["readonly", "src/a.py", false],
	] {
		allowed := file.allow with input as _input([c[0]], "file.write", {"path": c[1]})
		allowed == c[2]
	}
}

test_write_denied_with_reason if {
	"file write of 'README.md' is not allowed for roles [agent]" in file.deny with input as _input(["agent"], "file.write", {"path": "README.md"})
	"file delete of 'src/a.py' is not allowed for roles [readonly]" in file.deny with input as _input(["readonly"], "file.delete", {"path": "src/a.py"})
}

test_bad_paths_denied if {
	every c in [
		["/etc/passwd", "file path '/etc/passwd' must be relative to the workspace"],
		["../x", "file path '../x' must not contain '..'"],
		["a/../../x", "file path 'a/../../x' must not contain '..'"],
		["~/x", "file path '~/x' must not start with '~'"],
	] {
		c[1] in file.deny with input as _read(["admin"], c[0])
	}
	"file path contains control characters" in file.deny with input as _read(["admin"], "a\nb")
}

test_protected_locations_denied if {
	every c in [
		[".ssh/id_rsa", ".ssh"], ["./.ssh/id_rsa", ".ssh"], [".ssh", ".ssh"], ["sub/.ssh/x", ".ssh"],
		[".git/hooks/pre-commit", ".git/hooks"], [".git/config", ".git/config"], [".gnupg/k", ".gnupg"],
	] {
		msg := sprintf("file path '%s' is in a protected location (%s)", c)
		msg in file.deny with input as _read(["admin"], c[0])
	}
}

test_protected_lookalikes_allowed if {
	every p in [".sshx/a", "a.ssh", ".git/HEAD", ".git/hooksx", "docs/ssh.md"] {
		count(file.deny) == 0 with input as _read(["admin"], p)
	}
}

test_missing_path_denied if {
	"file path is missing" in file.deny with input as _input(["admin"], "file.read", {})
	"file path is missing" in file.deny with input as {"action": "file.read", "subject": {"id": "a", "roles": ["admin"]}}
}

test_unknown_operation_denied if {
	"unknown file operation" in file.deny with input as _input(["admin"], "file.chmod", {"path": "a"})
}

test_delete_root_denied if {
	"deleting the workspace root is not allowed" in file.deny with input as _input(["admin"], "file.delete", {"path": "."})
}

test_modes if {
	count(file.deny) == 0 with input as _input(["developer"], "file.write", {"path": "a", "mode": 420})
	count(file.deny) == 0 with input as _input(["developer"], "file.write", {"path": "a", "mode": null})
	every mode in [2048, 4095, -1, 1.5, "644", 512] {
		msg := sprintf("file mode %v is not allowed: use permission bits 0..0o777 without setuid, setgid or sticky", [mode])
		msg in file.deny with input as _input(["developer"], "file.write", {"path": "a", "mode": mode})
	}
}

test_world_writable_warns if {
	"file mode 438 makes 'a' writable by everyone" in file.warn with input as _input(["developer"], "file.write", {"path": "a", "mode": 438})
	count(file.warn) == 0 with input as _input(["developer"], "file.write", {"path": "a", "mode": 420})
}

test_recursive_flag_must_be_boolean if {
	"file recursive flag must be a boolean" in file.deny with input as _input(["developer"], "file.delete", {"path": "a", "recursive": "yes"})
	count(file.deny) == 0 with input as _input(["developer"], "file.delete", {"path": "a", "recursive": true})
}

test_probe_allows_an_operation_granted_anywhere if {
	probe := {"path": "", "probe": true}
	every c in [
		["agent", "file.write", true], ["agent", "file.delete", true], ["readonly", "file.write", false],
		["readonly", "file.delete", false], ["readonly", "file.list", true], ["developer", "file.delete", true],
	] {
		allowed := file.allow with input as _input([c[0]], c[1], probe)
		allowed == c[2]
		denied := count(file.deny) > 0 with input as _input([c[0]], c[1], probe)
		denied != c[2]
	}
}

test_probe_is_only_true if {
	not file.allow with input as _input(["agent"], "file.write", {"path": "", "probe": "yes"})
	"deleting the workspace root is not allowed" in file.deny with input as _input(["developer"], "file.delete", {"path": ""})
}
