# METADATA
# title: Command policy
# description: |
#   Rules for the action command.execute. A command is allowed when its program
#   is on the allowlist of one of the subject's roles (data.gateway.roles[_].commands)
#   and none of the deny rules below fires. The deny rules apply to every role,
#   admin included: they close the ways an allowlisted program can run code or
#   programs the allowlist did not name (inline code for shells and interpreters,
#   program runners such as xargs or env, find -exec, git -c, tar --to-command,
#   awk system(), sed e), unsafe environment variables, working directories
#   outside /workspace and bad timeouts. They are a deny-list and therefore best
#   effort: the allowlist is the primary control, the sandbox the last one.
#
#   The tables (which program is a shell, which options run programs) live in
#   data.gateway.command; the regular expressions live here, as raw strings.
#   The argument rules are only evaluated for programs with a `kind`, so a
#   command like echo costs little in the embedded engine (rego-cpp).
package mcp.command

import data.mcp.roles

# --- the program -------------------------------------------------------------

# METADATA
# title: Program
# description: |
#   The program the command runs: the name itself when it is a bare name, the
#   basename when it is an absolute path in one of data.gateway.command.program_dirs;
#   undefined for anything else.
program := program_name(input.command.name)

# METADATA
# title: Program name
# description: The program of command name `name` (see `program`); undefined when the name has neither form.
program_name(name) := name if bare_name(name)

program_name(name) := base if {
	is_string(name)
	parts := split(name, "/")
	n := count(parts)
	n >= 3
	base := parts[n - 1]
	bare_name(base)
	concat("/", array.slice(parts, 0, n - 1)) in data.gateway.command.program_dirs
}

# METADATA
# title: Bare name
# description: True when `name` is a plain program name (letters, digits, ._+-, not starting with . or -).
bare_name(name) if {
	is_string(name)
	regex.match(`^[A-Za-z0-9_+][A-Za-z0-9._+-]*$`, name)
}

# METADATA
# title: Program kind
# description: |
#   What kind of program this is for the argument rules (data.gateway.command.kinds:
#   shell, python, perl, ruby, node, env, find, git, tar, make, awk, sed, runner);
#   versioned interpreter names (python3.12, perl5.36) count as their family;
#   "other" for programs without argument rules. Always defined: rego-cpp caches
#   defined rule values but evaluates an undefined rule again at every reference.
kind := k if {
	k := data.gateway.command.kinds[program]
} else := "python" if {
	regex.match(`^(python|pypy)[0-9.]+$`, program)
} else := "perl" if {
	regex.match(`^perl[0-9.]+$`, program)
} else := "ruby" if {
	regex.match(`^ruby[0-9.]+$`, program)
} else := "other"

# METADATA
# title: Allow
# description: The program is on the allowlist of one of the subject's roles (deny rules still apply).
default allow := false

allow if {
	some r in roles.known
	program in data.gateway.roles[r].commands
}

# METADATA
# title: Arguments
# description: The command arguments, defined only when they are a list of strings.
arguments := input.command.args if string_list(input.command.args)

# METADATA
# title: String list
# description: True when `xs` is an array whose items are all strings.
string_list(xs) if {
	is_array(xs)
	not _has_non_string(xs)
}

_has_non_string(xs) if {
	some x in xs
	not is_string(x)
}

# --- option parsing ------------------------------------------------------------

# How the program parses its leading options (data.gateway.command.syntax[kind]):
# `value` options take the next argument as their value; after the value of a
# `stop` option, options end.
_syntax := data.gateway.command.syntax[kind]

# METADATA
# title: End of options
# description: |
#   Index of the argument that ends option parsing under `syntax`: the first
#   operand, "-", "--", or the value of a stop option; count(args) when none does.
#   The first of an array comprehension in index order, not min(): rego-cpp's
#   min() compares numbers as text (min({2, 10}) is 10).
options_end(args, syntax) := ends[0] if {
	ends := [i | some i; args[i]; _ends_options(args, i, syntax)]
	count(ends) > 0
} else := count(args)

_ends_options(args, i, syntax) if {
	not startswith(args[i], "-")
	not _option_value(args, i, syntax)
}

_ends_options(args, i, syntax) if {
	args[i] == "-"
	not _option_value(args, i, syntax)
}

_ends_options(args, i, syntax) if {
	args[i] == "--"
	not _option_value(args, i, syntax)
}

_ends_options(args, i, syntax) if {
	i > 0
	args[i - 1] in syntax.stop
}

_option_value(args, i, syntax) if {
	i > 0
	args[i - 1] in syntax.value
}

# METADATA
# title: First operand
# description: The first operand (script, module, subcommand or program) at or after index `end`; undefined when there is none.
first_operand(args, end) := args[end + 1] if {
	args[end] == "--"
} else := args[end]

_end := options_end(arguments, _syntax)

_leading := array.slice(arguments, 0, _end)

_operand := first_operand(arguments, _end)

# --- deny: shape, name and allowlist ------------------------------------------

# METADATA
# title: Deny reasons
# description: Human-readable reasons the command is denied; empty when it may run.
deny contains "command.execute needs a command object" if not is_object(object.get(input, "command", null))

deny contains "command has no name" if not is_string(object.get(input, ["command", "name"], null))

deny contains msg if {
	name := input.command.name
	is_string(name)
	not program
	dirs := roles.plain(concat(" or ", data.gateway.command.program_dirs))
	msg := sprintf("command name '%s' must be a bare name or an absolute path under %s", [name, dirs])
}

deny contains msg if {
	not allow
	prog := program
	msg := sprintf("command '%s' is not allowed for roles %s", [prog, roles.known_label])
}

deny contains "command arguments must be a list of strings" if not arguments

# --- deny: argument rules by kind -----------------------------------------------

# The argument rules of programs with a kind (shells, interpreters, find, git,
# ...) are collected in _kind_deny and only evaluated for such programs.
deny contains msg if {
	kind != "other"
	some msg in _kind_deny
}

# --- programs that run other programs ------------------------------------------

_kind_deny contains msg if {
	kind == "runner"
	msg := sprintf("command '%s' runs another program and is never allowed", [program])
}

# --- shells and interpreters -------------------------------------------

default _interpreter := false

_interpreter if kind in data.gateway.command.interpreters

# METADATA
# title: Inline code option
# description: True when option `opt` makes an interpreter of kind `k` run code given in the arguments.
inline_code("shell", opt) if regex.match(`^-[A-Za-z]*c`, opt)

inline_code("shell", opt) if regex.match(`^(--command|--init-command|-C)`, opt)

inline_code("python", opt) if regex.match(`^-[A-Za-z]*c`, opt)

inline_code("perl", opt) if regex.match(`^-([acfFnpsStTuUvwWX]|l[0-7]*|0[0-7xX]*)*[eE]`, opt)

inline_code("ruby", opt) if regex.match(`^-([acdlnpsvwyU]|0[0-7]*)*e`, opt)

inline_code("node", opt) if regex.match(`^(-e|-p|-pe|-ep|--eval|--print)(=|$)`, opt)

inline_code("node", opt) if contains(opt, "data:")

# METADATA
# title: Stdin code option
# description: True when option `opt` makes an interpreter of kind `k` read code from stdin.
stdin_code("shell", opt) if regex.match(`^-[A-Za-z]*[si]`, opt)

stdin_code("python", opt) if regex.match(`^-[A-Za-z]*i`, opt)

stdin_code("node", "-i")

stdin_code("node", "--interactive")

_kind_deny contains msg if {
	_interpreter
	some opt in _leading
	inline_code(kind, opt)
	msg := sprintf("argument '%s' to '%s' executes code", [opt, program])
}

_kind_deny contains msg if {
	_interpreter
	some opt in _leading
	stdin_code(kind, opt)
	msg := sprintf("argument '%s' to '%s' reads code from stdin", [opt, program])
}

_kind_deny contains msg if {
	_interpreter
	arguments
	not _operand
	not _any_inline(kind, _leading)
	not _any_info(_leading)
	msg := sprintf("'%s' without a script file reads code from stdin", [program])
}

_any_inline(k, opts) if {
	some opt in opts
	inline_code(k, opt)
}

_any_info(opts) if {
	some opt in opts
	opt in data.gateway.command.info_options
}

_kind_deny contains msg if {
	_interpreter
	_operand == "-"
	msg := sprintf("'%s' with script '-' reads code from stdin", [program])
}

# python -m MODULE: modules that run code given as arguments or read from stdin.
_kind_deny contains msg if {
	kind == "python"
	_end > 0
	arguments[_end - 1] == "-m"
	mod := arguments[_end]
	mod in data.gateway.command.inline_modules
	msg := sprintf("module '%s' run by '%s' executes inline code", [mod, program])
}

_kind_deny contains msg if {
	kind == "python"
	some opt in _leading
	regex.match(`^-([A-Za-z]+m|m.)`, opt)
	msg := sprintf("argument '%s' to '%s' hides -m MODULE; pass -m and the module separately", [opt, program])
}

_kind_deny contains msg if {
	kind == "perl"
	some opt in _leading
	regex.match(`^-[mM]`, opt)
	not regex.match(`^-[mM]-?[A-Za-z_][A-Za-z0-9_:]*(=[A-Za-z0-9_,:]*)?$`, opt)
	msg := sprintf("argument '%s' to '%s' loads a module with code", [opt, program])
}

_kind_deny contains msg if {
	kind == "perl"
	some opt in _leading
	startswith(opt, "-d")
	msg := sprintf("argument '%s' to '%s' runs the debugger", [opt, program])
}

# --- env -----------------------------------------------------------------

_kind_deny contains msg if {
	kind == "env"
	some opt in _leading
	regex.match(`^(-[A-Za-z0]*S|--split-string)`, opt)
	msg := sprintf("argument '%s' to 'env' runs a command line", [opt])
}

_kind_deny contains msg if {
	kind == "env"
	rest := array.slice(arguments, _end, count(arguments))
	cmds := [x | some i; x := rest[i]; not contains(x, "="); not _leading_dashdash(i, x)]
	count(cmds) > 0
	msg := sprintf("command 'env' runs another program '%s'", [cmds[0]])
}

_leading_dashdash(0, "--")

# --- options that run programs or write files ---------------------------

# METADATA
# title: Option candidates
# description: |
#   The option names argument `arg` can be: itself, the part before "=" in
#   "--opt=value", and its first two characters ("-Ixz" is -I with value xz).
option_candidates(arg) := {arg, split(arg, "=")[0], substring(arg, 0, 2)}

_kind_deny contains msg if {
	effects := data.gateway.command.option_effects[kind]
	some arg in arguments
	some opt in option_candidates(arg)
	effect := effects[opt]
	msg := sprintf("argument '%s' to '%s' %s", [arg, program, effect])
}

# tar: -I/-F inside a cluster ("-xvIzstd") or in the old-style first argument ("xIf").
_kind_deny contains msg if {
	kind == "tar"
	some i, arg in arguments
	tar_cluster_runs(i, arg)
	msg := sprintf("argument '%s' to 'tar' runs another program", [arg])
}

# METADATA
# title: tar cluster runs a program
# description: True when tar argument `arg` at index `i` is an option cluster containing -I or -F.
tar_cluster_runs(_, arg) if regex.match(`^-[A-Za-z]+[IF]`, arg)

tar_cluster_runs(0, arg) if regex.match(`^[A-Za-z]*[IF][A-Za-z]*$`, arg)

# --- git -----------------------------------------------------------------

_kind_deny contains msg if {
	kind == "git"
	some arg in arguments
	regex.match(`^(ext|fd)::`, arg)
	msg := sprintf("argument '%s' to 'git' uses a transport that runs programs", [arg])
}

_kind_deny contains msg if {
	kind == "git"
	some msg in git_denials(_operand, arguments)
}

# METADATA
# title: git subcommand denials
# description: Reasons git subcommand `sub` with arguments `args` runs programs (or makes git run them later).
git_denials("config", args) := {"git config may only read (--get, --list): settings can run programs"} if {
	not _git_config_read_only(args)
}

git_denials("filter-branch", _) := {"git filter-branch runs other programs"}

git_denials("bisect", args) := {"git bisect run runs another program"} if "run" in args

git_denials("submodule", args) := {"git submodule foreach runs another program"} if "foreach" in args

git_denials("rebase", args) := {sprintf("argument '%s' to 'git rebase' runs another program", [x]) |
	some x in args
	regex.match(`^-[A-Za-z]*x`, x)
}

git_denials("clone", args) := _git_upload_pack("clone", args)

git_denials("ls-remote", args) := _git_upload_pack("ls-remote", args)

_git_upload_pack(sub, args) := {sprintf("argument '%s' to 'git %s' runs another program", [x, sub]) |
	some x in args
	startswith(x, "-u")
}

_git_config_read_only(args) if {
	some a in args
	a in data.gateway.command.git_config_read_options
}

_git_config_read_only(args) if {
	some i, a in args
	a == "config"
	args[i + 1] in data.gateway.command.git_config_read_subcommands
}

# --- awk and sed ---------------------------------------------------------

_kind_deny contains msg if {
	kind == "awk"
	some arg in arguments
	regex.match(`system[[:space:]]*\(`, arg)
	msg := sprintf("argument '%s' to '%s' runs a shell command", [arg, program])
}

_kind_deny contains msg if {
	kind == "awk"
	some arg in arguments
	regex.match(`(^|[^|])\|([^|]|$)`, arg)
	msg := sprintf("argument '%s' to '%s' pipes to or from a shell command", [arg, program])
}

_kind_deny contains msg if {
	kind == "awk"
	some arg in arguments
	contains(arg, "@load")
	msg := sprintf("argument '%s' to '%s' loads an extension", [arg, program])
}

_kind_deny contains msg if {
	kind == "sed"
	not "--sandbox" in arguments
	some arg in arguments
	sed_runs_command(arg)
	msg := sprintf("argument '%s' to '%s' executes a shell command (the e command or flag)", [arg, program])
}

# METADATA
# title: sed runs a command
# description: |
#   True when sed script `text` (or an option carrying one: -e SCRIPT,
#   --expression=SCRIPT) contains the e command or an s///e flag. Errs on the
#   side of denying; sed --sandbox switches these commands off.
sed_runs_command(text) if {
	script := regex.replace(text, `^(--expression=|-[nrEsuz]*e)`, "")
	_sed_e(script)
}

_sed_e(script) if regex.match(`(^|[;{}\n0-9$/!])[[:space:]]*e([[:space:]]|[;}]|$)`, script)

_sed_e(script) if regex.match(`[^[:alnum:][:space:]\\][gpiImM0-9w]*e[gpiImM0-9]*[[:space:]]*($|[;}\n])`, script)

# --- deny: environment, working directory, timeout ---------------------------

deny contains "command environment must be an object of strings" if {
	not is_object(object.get(input, ["command", "env"], {}))
}

deny contains msg if {
	some name, value in input.command.env
	not is_string(value)
	msg := sprintf("environment variable '%v' must have a string value", [name])
}

deny contains msg if {
	some name, _ in input.command.env
	msg := env_denial(name)
}

# METADATA
# title: Environment variable denial
# description: |
#   Why environment variable `name` may not be set (data.gateway.command.env:
#   denied_names, denied_prefixes, allowed_names as exceptions); undefined when it may.
env_denial(name) := sprintf("environment variable name '%v' is not valid", [name]) if {
	not _env_name(name)
} else := sprintf("environment variable '%s' is not allowed: it changes how programs start", [name]) if {
	not name in data.gateway.command.env.allowed_names
	_env_denied(name)
}

_env_name(name) if {
	is_string(name)
	regex.match(`^[A-Za-z_][A-Za-z0-9_]*$`, name)
}

_env_denied(name) if name in data.gateway.command.env.denied_names

_env_denied(name) if {
	some prefix in data.gateway.command.env.denied_prefixes
	startswith(name, prefix)
}

deny contains "command working directory is missing" if not is_string(object.get(input, ["command", "cwd"], null))

deny contains msg if {
	cwd := input.command.cwd
	is_string(cwd)
	not inside_workspace(cwd, data.gateway.command.workspace)
	msg := sprintf("working directory '%s' is outside %s", [cwd, data.gateway.command.workspace])
}

# METADATA
# title: Inside the workspace
# description: True when absolute path `path` is `root` or below it, without ".." segments.
inside_workspace(path, root) if {
	startswith(path, "/")
	not ".." in split(path, "/")
	_at_or_below(concat("", ["/", roles.normalise(path)]), root)
}

_at_or_below(path, root) if path == root

_at_or_below(path, root) if startswith(path, concat("", [root, "/"]))

deny contains "command timeout must be a positive number of seconds" if not requested_timeout

# METADATA
# title: Requested timeout
# description: The timeout the caller asked for, defined only when it is a positive number.
requested_timeout := t if {
	t := input.command.timeout
	is_number(t)
	t > 0
}

# --- limits and warnings ------------------------------------------------------

# METADATA
# title: Timeout
# description: |
#   The granted timeout in seconds, min(requested, cap of the subject's roles).
#   Spelled with <= because rego-cpp's min() and max() compare numbers as text.
timeout_s := t if {
	t := requested_timeout
	t <= roles.caps.timeout_s
} else := roles.caps.timeout_s

# METADATA
# title: Limits
# description: Resource limits granted for the run, each the most generous cap over the subject's roles.
limits := object.union(roles.caps, {"timeout_s": timeout_s})

# METADATA
# title: Warnings
# description: Things the caller should know about an allowed command (a capped timeout).
warn contains msg if {
	t := requested_timeout
	cap := roles.caps.timeout_s
	t > cap
	msg := sprintf("timeout %vs exceeds the cap for roles %s; capped to %vs", [t, roles.known_label, cap])
}
