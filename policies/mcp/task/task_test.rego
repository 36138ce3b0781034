package mcp.task_test

import data.mcp.task

_input(id, roles, action, t) := {
	"version": 1,
	"action": action,
	"subject": {"id": id, "roles": roles, "auth": "token"},
	"task": t,
}

test_owner_may_read_and_cancel if {
	every action in ["task.read", "task.cancel"] {
		task.allow with input as _input("alice", ["developer"], action, {"id": "t1", "owner": "alice"})
		count(task.deny) == 0 with input as _input("alice", ["developer"], action, {"id": "t1", "owner": "alice"})
	}
}

test_non_owner_denied if {
	not task.allow with input as _input("bob", ["developer"], "task.read", {"id": "t1", "owner": "alice"})
	"subject 'bob' may not read task 't1' owned by 'alice'" in task.deny with input as _input("bob", ["developer"], "task.read", {"id": "t1", "owner": "alice"})
	"subject 'bob' may not cancel task 't1' owned by 'alice'" in task.deny with input as _input("bob", ["agent"], "task.cancel", {"id": "t1", "owner": "alice"})
}

test_admin_may_act_on_any_task if {
	every action in ["task.read", "task.cancel"] {
		task.allow with input as _input("root", ["admin"], action, {"id": "t1", "owner": "alice"})
	}
}

test_access if {
	task.access == "any" with input as _input("x", ["admin", "readonly"], "task.read", {})
	task.access == "own" with input as _input("x", ["readonly"], "task.read", {})
	task.access == "none" with input as _input("x", ["nobody"], "task.read", {})
}

test_role_without_access_denied if {
	not task.allow with input as _input("alice", ["readonly"], "task.read", {"id": "t1", "owner": "alice"})
		with data.gateway.roles as {"readonly": {"tasks": {"read": "none"}}}
}

test_missing_task_fields_denied if {
	reasons := task.deny with input as _input("alice", ["admin"], "task.read", {})
	"task id is missing" in reasons
	"task owner is missing" in reasons
	"task owner is missing" in task.deny with input as _input("alice", ["admin"], "task.read", {"id": "t", "owner": ""})
	"task id is missing" in task.deny with input as {"action": "task.read", "subject": {"id": "a", "roles": ["admin"]}}
}

test_unknown_operation if {
	"unknown task operation" in task.deny with input as _input("alice", ["admin"], "task.delete", {"id": "t", "owner": "alice"})
	not task.operation with input.action as "file.read"
}
