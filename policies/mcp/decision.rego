# METADATA
# title: MCP gateway decision
# description: |
#   The one document the gateway asks for, data.mcp.decision. It checks the
#   input envelope (version 1, action, subject) and combines the area policies:
#   mcp.command and mcp.network for command.execute, mcp.file for file.*,
#   mcp.task for task.*. Anything missing or malformed denies with a reason.
package mcp

import data.mcp.command
import data.mcp.file
import data.mcp.network
import data.mcp.roles
import data.mcp.task

# METADATA
# title: Decision
# description: |
#   {"allow", "deny_reasons", "warnings", "limits"}: allow is true only when an
#   area policy grants the request and no reason denies it; a denial always
#   carries at least one reason.
# entrypoint: true
decision := {
	"allow": allow,
	"deny_reasons": deny_reasons,
	"warnings": sort([w | some w in warn]),
	"limits": limits,
}

# METADATA
# title: Allow
# description: An area policy grants the request and no rule denies it.
default allow := false

allow if {
	count(_reasons) == 0
	_granted
}

# METADATA
# title: Deny reasons
# description: Sorted reasons for a denial; empty when allowed.
deny_reasons := sort([r | some r in _reasons]) if {
	count(_reasons) > 0
} else := ["no policy rule grants this request"] if {
	not allow
} else := []

_reasons := _envelope | _area_reasons

# --- envelope ------------------------------------------------------------------

_envelope contains "policy input has no version" if not input.version

# The value itself is not echoed: engines render floats differently, and the
# reason must be identical whichever engine decides.
_envelope contains "unsupported policy input version (this policy reads version 1)" if {
	input.version
	input.version != 1
}

_envelope contains "policy input has no action" if not is_string(object.get(input, "action", null))

_envelope contains msg if {
	a := input.action
	is_string(a)
	not a in data.gateway.actions
	msg := sprintf("unknown action '%s'", [a])
}

_envelope contains "policy input has no subject id" if {
	not _non_empty_string(object.get(input, ["subject", "id"], null))
}

_envelope contains "subject roles must be a list of strings" if {
	not command.string_list(object.get(input, ["subject", "roles"], null))
}

_envelope contains msg if {
	count(roles.known) == 0
	msg := sprintf("subject '%v' has no recognised role", [roles.plain(object.get(input, ["subject", "id"], ""))])
}

_non_empty_string(s) if {
	is_string(s)
	s != ""
}

# --- areas ---------------------------------------------------------------------

_area_reasons := command.deny | network.deny if {
	input.action == "command.execute"
} else := file.deny if {
	file.operation
} else := task.deny if {
	task.operation
} else := set()

default _granted := false

_granted if {
	input.action == "command.execute"
	command.allow
}

_granted if {
	file.operation
	file.allow
}

_granted if {
	task.operation
	task.allow
}

# --- warnings and limits -------------------------------------------------------

# METADATA
# title: Warnings
# description: Things the caller should know; they never change allow.
warn contains msg if {
	some role in roles.unknown
	msg := sprintf("unknown role '%s' ignored", [role])
}

warn contains "subject is not authenticated (auth none)" if input.subject.auth == "none"

warn contains msg if {
	input.action == "command.execute"
	some msg in command.warn
}

warn contains msg if {
	file.operation
	some msg in file.warn
}

# METADATA
# title: Limits
# description: |
#   For command.execute, the resource limits granted (see mcp.command.limits)
#   plus "network"; an empty object for other actions or without a known role.
limits := object.union(command.limits, {"network": network.granted}) if {
	input.action == "command.execute"
	count(roles.known) > 0
} else := {}
