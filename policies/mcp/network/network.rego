# METADATA
# title: Network policy
# description: |
#   Network access for command.execute. The sandbox has no network unless the
#   input asks for "full" and one of the subject's roles grants it
#   (data.gateway.roles[_].network). A missing sandbox section means "none".
package mcp.network

import data.mcp.roles

# METADATA
# title: Requested mode
# description: The requested network mode, "none" when the input does not ask.
default requested := "none"

requested := input.sandbox.network

# METADATA
# title: Role grants network
# description: True when one of the subject's roles is granted network access.
role_grants if {
	some r in roles.known
	data.gateway.roles[r].network == true
}

# METADATA
# title: Granted
# description: True when the run gets network access (requested "full" and granted by a role).
default granted := false

granted if {
	requested == "full"
	role_grants
}

# METADATA
# title: Deny reasons
# description: Human-readable reasons the network request is denied.
deny contains msg if {
	not requested in {"none", "full"}
	msg := sprintf("network mode '%v' is not valid: use none or full", [requested])
}

deny contains msg if {
	requested == "full"
	not role_grants
	msg := sprintf("network access is not allowed for roles %s", [roles.known_label])
}
