package mcp.network_test

import data.mcp.network

_input(roles, sandbox) := {"subject": {"id": "a", "roles": roles}, "sandbox": sandbox}

test_default_is_none if {
	network.requested == "none" with input as {"subject": {"id": "a", "roles": ["admin"]}}
	not network.granted with input as {"subject": {"id": "a", "roles": ["admin"]}}
	count(network.deny) == 0 with input as {"subject": {"id": "a", "roles": ["agent"]}}
}

test_full_granted_by_role if {
	every role in ["admin", "developer"] {
		network.granted with input as _input([role], {"network": "full"})
		count(network.deny) == 0 with input as _input([role], {"network": "full"})
	}
}

test_full_denied_without_grant if {
	every role in ["agent", "readonly"] {
		not network.granted with input as _input([role], {"network": "full"})
		msg := sprintf("network access is not allowed for roles [%s]", [role])
		msg in network.deny with input as _input([role], {"network": "full"})
	}
}

test_none_never_granted if {
	not network.granted with input as _input(["admin"], {"network": "none"})
}

test_invalid_mode_denied if {
	"network mode 'host' is not valid: use none or full" in network.deny with input as _input(["admin"], {"network": "host"})
	"network mode 'true' is not valid: use none or full" in network.deny with input as _input(["admin"], {"network": true})
}
