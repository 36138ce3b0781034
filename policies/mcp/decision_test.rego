package mcp_test

import data.mcp

_base := {
	"version": 1,
	"subject": {"id": "alice", "roles": ["developer"], "auth": "token"},
	"sandbox": {"network": "none"},
	"request": {"id": "r1", "transport": "rest", "source": "127.0.0.1"},
}

_cmd(roles, name, args) := object.union(_base, {
	"action": "command.execute",
	"subject": {"id": "alice", "roles": roles, "auth": "token"},
	"command": {"name": name, "args": args, "cwd": "/workspace", "env": {}, "timeout": 30},
})

test_allowed_command_decision if {
	d := mcp.decision with input as _cmd(["developer"], "echo", ["hi"])
	d.allow
	d.deny_reasons == []
	d.warnings == []
	d.limits == {
		"timeout_s": 30, "memory_bytes": 1073741824, "pids": 256, "cpu_seconds": 600,
		"output_bytes": 4194304, "network": false,
	}
}

test_denied_command_decision if {
	d := mcp.decision with input as _cmd(["developer"], "sh", ["-c", "id"])
	not d.allow
	d.deny_reasons == ["argument '-c' to 'sh' executes code"]
}

test_network_granted_in_limits if {
	d := mcp.decision with input as object.union(_cmd(["developer"], "curl", ["https://x"]), {"sandbox": {"network": "full"}})
	d.allow
	d.limits.network == true
}

test_network_denied_for_agent if {
	d := mcp.decision with input as object.union(_cmd(["agent"], "git", ["status"]), {"sandbox": {"network": "full"}})
	not d.allow
	"network access is not allowed for roles [agent]" in d.deny_reasons
}

test_file_decision if {
	d := mcp.decision with input as object.union(_base, {"action": "file.read", "file": {"path": "src/a.txt"}})
	d.allow
	d.limits == {}
	d2 := mcp.decision with input as object.union(_base, {"action": "file.read", "file": {"path": ".ssh/id_rsa"}})
	not d2.allow
}

test_file_warning_passed_on if {
	d := mcp.decision with input as object.union(_base, {"action": "file.write", "file": {"path": "a", "mode": 438}})
	d.allow
	d.warnings == ["file mode 438 makes 'a' writable by everyone"]
}

test_task_decision if {
	d := mcp.decision with input as object.union(_base, {"action": "task.read", "task": {"id": "t", "owner": "alice"}})
	d.allow
	d2 := mcp.decision with input as object.union(_base, {"action": "task.cancel", "task": {"id": "t", "owner": "bob"}})
	d2.deny_reasons == ["subject 'alice' may not cancel task 't' owned by 'bob'"]
}

test_empty_input_denies if {
	d := mcp.decision with input as {}
	not d.allow
	d.deny_reasons == [
		"policy input has no action",
		"policy input has no subject id",
		"policy input has no version",
		"subject '' has no recognised role",
		"subject roles must be a list of strings",
	]
	d.limits == {}
}

test_envelope_problems if {
	every c in [
		[{"version": 2}, "unsupported policy input version (this policy reads version 1)"],
		[{"action": "file.chmod"}, "unknown action 'file.chmod'"],
		[{"action": 5}, "policy input has no action"],
		[{"subject": {"id": "", "roles": ["developer"]}}, "policy input has no subject id"],
		[{"subject": {"id": "x", "roles": "developer"}}, "subject roles must be a list of strings"],
		[{"subject": {"id": "x", "roles": ["nobody"]}}, "subject 'x' has no recognised role"],
	] {
		doc := object.union(_cmd(["developer"], "echo", []), c[0])
		d := mcp.decision with input as doc
		not d.allow
		c[1] in d.deny_reasons
	}
}

test_unknown_role_warns if {
	d := mcp.decision with input as _cmd(["developer", "wizard"], "echo", [])
	d.allow
	"unknown role 'wizard' ignored" in d.warnings
}

test_unauthenticated_subject_warns if {
	doc := object.union(_cmd(["developer"], "echo", []), {"subject": {"id": "alice", "roles": ["developer"], "auth": "none"}})
	d := mcp.decision with input as doc
	"subject is not authenticated (auth none)" in d.warnings
}

test_timeout_warning_passed_on if {
	doc := object.union(_cmd(["readonly"], "echo", []), {"command": {"timeout": 300}})
	d := mcp.decision with input as doc
	d.allow
	d.warnings == ["timeout 300s exceeds the cap for roles [readonly]; capped to 30s"]
	d.limits.timeout_s == 30
}

test_not_granted_without_reason_still_explains if {
	d := mcp.decision with input as object.union(_base, {"action": "file.read", "file": {"path": "a"}})
		with data.mcp.file.allow as false
		with data.mcp.file.deny as set()
	not d.allow
	d.deny_reasons == ["no policy rule grants this request"]
}

_probe(roles, action) := object.union(_base, {
	"action": action,
	"subject": {"id": "alice", "roles": roles, "auth": "token"},
	"file": {"path": "", "probe": true},
})

test_file_probe_decision if {
	mcp.decision.allow with input as _probe(["agent"], "file.write")
	d := mcp.decision with input as _probe(["readonly"], "file.write")
	not d.allow
	d.deny_reasons == ["file write of '' is not allowed for roles [readonly]"]
}
