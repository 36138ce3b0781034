# METADATA
# title: Task policy
# description: |
#   Rules for the actions task.read and task.cancel: the task's owner may act on
#   it when a role grants "own" access, and a role granting "any" access (admin)
#   may act on every task (data.gateway.roles[_].tasks).
package mcp.task

import data.mcp.roles

# METADATA
# title: Operation
# description: The task operation of the action (read or cancel), undefined for other actions.
operation := op if {
	is_string(input.action)
	startswith(input.action, "task.")
	op := substring(input.action, 5, -1)
	op in data.gateway.task_operations
}

# METADATA
# title: Access
# description: The task access ("any", "own" or "none") the subject's roles grant for the operation; the widest wins.
access := "any" if {
	some r in roles.known
	object.get(data.gateway.roles[r], ["tasks", operation], "none") == "any"
} else := "own" if {
	some r in roles.known
	object.get(data.gateway.roles[r], ["tasks", operation], "none") == "own"
} else := "none"

# METADATA
# title: Allow
# description: The subject owns the task (with "own" access) or has "any" access.
default allow := false

allow if {
	_task_ok
	access == "any"
}

allow if {
	_task_ok
	access == "own"
	input.task.owner == input.subject.id
}

_task_ok if {
	_non_empty(input.task.id)
	_non_empty(input.task.owner)
}

_non_empty(s) if {
	is_string(s)
	s != ""
}

# METADATA
# title: Deny reasons
# description: Human-readable reasons the task operation is denied.
deny contains "unknown task operation" if not operation

deny contains "task id is missing" if not _non_empty(object.get(input, ["task", "id"], null))

deny contains "task owner is missing" if not _non_empty(object.get(input, ["task", "owner"], null))

deny contains msg if {
	op := operation
	_task_ok
	not allow
	msg := sprintf(
		"subject '%v' may not %s task '%s' owned by '%s'",
		[input.subject.id, op, input.task.id, input.task.owner],
	)
}
