package render

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"net/url"
	"regexp"
	"strconv"
	"strings"
	"text/template"
	"unicode/utf8"
)

// Func documents one function a template may call.
type Func struct {
	Name, Usage, Doc string
}

// Funcs is the documented function set, the only functions a template may call: Keyward's own and
// the text/template builtins that cannot reach anything but their arguments. None reads a file, the
// environment or the network; every result is charged to the execution's allocation budget.
var Funcs = []Func{
	{"b64enc", "b64enc S", "S in standard base64 (with padding)"},
	{"b64dec", "b64dec S", "S decoded from standard base64 (padding optional; line breaks ignored)"},
	{"pem", "pem TYPE S", `S (binary, e.g. b64dec of a DER certificate) as one PEM block of TYPE ("CERTIFICATE"; A-Z, 0-9 and spaces)`},
	{"list", "list S...", "a list of the arguments, for join"},
	{"join", "join SEP LIST", "the list's elements separated by SEP"},
	{"quote", "quote S", `S in double quotes with Go/C escapes ("a\"b")`},
	{"json", "json S", "S as a JSON string literal (invalid UTF-8 becomes U+FFFD)"},
	{"shquote", "shquote S", `S in POSIX shell single quotes ('it'\''s'), safe in sh, bash and .env files read by a shell`},
	{"urlquery", "urlquery S", "S escaped for a URL query value (url.QueryEscape)"},
	{"userinfo", "userinfo USER PASSWORD", "USER:PASSWORD escaped for the userinfo of a URL (scheme://userinfo@host)"},
	{"pgpass", "pgpass S", `S escaped for a field of a .pgpass file ('\' and ':' get a backslash)`},
	{"trim", "trim S", "S without leading and trailing white space (a value stored with a newline)"},
	{"replace", "replace OLD NEW S", "S with every OLD replaced by NEW"},
	{"and", "and X Y...", "builtin: the first empty argument, or the last"},
	{"or", "or X Y...", "builtin: the first non-empty argument, or the last"},
	{"not", "not X", "builtin: whether X is empty"},
	{"eq", "eq X Y...", "builtin: whether X equals any Y"},
	{"ne", "ne X Y", "builtin: whether X differs from Y"},
	{"len", "len S", "builtin: the length of S in bytes"},
	{"index", `index .NAME "KEY"`, "builtin, in this form only: the value of KEY of NAME, for keys that are not identifiers (tls.crt)"},
}

// builtinArity is how many arguments each allowed text/template builtin takes: min and max (-1: any).
var builtinArity = map[string][2]int{"and": {1, -1}, "or": {1, -1}, "not": {1, 1}, "eq": {2, -1}, "ne": {2, 2}, "len": {1, 1}, "index": {2, 2}}

// funcError is a function's refusal. Its message names the function and what was wrong, never an
// argument's value, so it is the one execution error passed on as it is.
type funcError struct {
	msg      string
	tooLarge bool
}

func (e *funcError) Error() string { return e.msg }

func refusal(format string, args ...any) error { return &funcError{msg: fmt.Sprintf(format, args...)} }

// budget is what the functions of one execution may still allocate, together. There are no loops
// in a template, but a variable can be passed to a function many times over (a chain of join or
// replace would otherwise grow exponentially), so every result is charged.
type budget struct{ left int64 }

func (b *budget) take(fn string, n int) error {
	n = max(n, 0) // a replace that shrinks its input frees nothing: it allocates its result
	if int64(n) > b.left {
		b.left = 0
		return &funcError{msg: fn + ": the results of the template's functions exceed their budget (the volume's sizeLimit)", tooLarge: true}
	}
	b.left -= int64(n)
	return nil
}

// result charges r's result: refused at once when even its input (in bytes) exceeds what is left,
// otherwise charged its actual length.
func (b *budget) result(fn string, in int, r func() string) (string, error) {
	if int64(in) > b.left {
		return "", b.take(fn, in)
	}
	s := r()
	if err := b.take(fn, len(s)); err != nil {
		return "", err
	}
	return s, nil
}

var pemTypeRE = regexp.MustCompile(`^[A-Z0-9]+( [A-Z0-9]+)*$`)

// funcs is the function map of one execution, charging b. A template is parsed with the same
// names and signatures (funcs(nil) is never called).
func funcs(b *budget) template.FuncMap {
	return template.FuncMap{
		"b64enc": func(s string) (string, error) {
			if err := b.take("b64enc", base64.StdEncoding.EncodedLen(len(s))); err != nil {
				return "", err
			}
			return base64.StdEncoding.EncodeToString([]byte(s)), nil
		},
		"b64dec": func(s string) (string, error) {
			if err := b.take("b64dec", base64.RawStdEncoding.DecodedLen(len(s))); err != nil {
				return "", err
			}
			out, err := base64.RawStdEncoding.DecodeString(strings.TrimRight(s, "=\r\n"))
			if err != nil {
				return "", refusal("b64dec: the value is not standard base64")
			}
			return string(out), nil
		},
		"pem": func(typ, s string) (string, error) {
			if len(typ) > 64 || !pemTypeRE.MatchString(typ) {
				return "", refusal("pem: the type is not a PEM type (A-Z, 0-9 and single spaces; it is not shown: it may be a value)")
			}
			return b.result("pem", len(s), func() string {
				return string(pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: []byte(s)}))
			})
		},
		"list": func(s ...string) ([]string, error) {
			if err := b.take("list", 16*len(s)); err != nil {
				return nil, err
			}
			return s, nil
		},
		"join": func(sep string, list []string) (string, error) {
			n := len(sep) * max(len(list)-1, 0)
			for _, s := range list {
				n += len(s)
			}
			if err := b.take("join", n); err != nil {
				return "", err
			}
			return strings.Join(list, sep), nil
		},
		"quote": func(s string) (string, error) {
			return b.result("quote", len(s)+2, func() string { return strconv.Quote(s) })
		},
		"json": func(s string) (string, error) {
			return b.result("json", len(s)+2, func() string {
				var buf bytes.Buffer
				enc := json.NewEncoder(&buf)
				enc.SetEscapeHTML(false)
				enc.Encode(s) // a string always encodes
				return strings.TrimSuffix(buf.String(), "\n")
			})
		},
		"shquote": func(s string) (string, error) {
			if err := b.take("shquote", len(s)+2+3*strings.Count(s, "'")); err != nil {
				return "", err
			}
			return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'", nil
		},
		"urlquery": func(s string) (string, error) {
			return b.result("urlquery", len(s), func() string { return url.QueryEscape(s) })
		},
		"userinfo": func(user, password string) (string, error) {
			return b.result("userinfo", len(user)+len(password)+1, func() string { return url.UserPassword(user, password).String() })
		},
		"pgpass": func(s string) (string, error) {
			if err := b.take("pgpass", len(s)+strings.Count(s, `\`)+strings.Count(s, ":")); err != nil {
				return "", err
			}
			return strings.NewReplacer(`\`, `\\`, ":", `\:`).Replace(s), nil
		},
		"trim": func(s string) string { return strings.TrimSpace(s) }, // a substring: nothing allocated
		"replace": func(old, new, s string) (string, error) {
			n := strings.Count(s, old)
			if old == "" {
				n = utf8.RuneCountInString(s) + 1
			}
			if err := b.take("replace", len(s)+n*(len(new)-len(old))); err != nil {
				return "", err
			}
			return strings.ReplaceAll(s, old, new), nil
		},
	}
}
