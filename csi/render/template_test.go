package render

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"text/template"
	"time"

	"github.com/keyward/keyward/internal/fault"
)

const canary = "CANARY-s3cr3t:p@ss/'word"

var dbNames = map[string]bool{"db": true, "tls": true}

// Every way a template could read what it did not declare, reach a file, the environment or
// anything but its arguments, loop, or call another template is refused at parse, naming where.
func TestParseRefuses(t *testing.T) {
	for name, tc := range map[string]struct{ src, msg string }{
		"undeclared name":          {`{{ .other.password }}`, `"other" is not one of the entry's refs`},
		"undeclared via $":         {`{{ $.other.password }}`, `"other" is not one of the entry's refs`},
		"undeclared via index":     {`{{ index .other "tls.crt" }}`, `"other" is not one of the entry's refs`},
		"env":                      {`{{ env "HOME" }}`, `function "env" not defined`},
		"readFile":                 {`{{ readFile "/etc/shadow" }}`, `function "readFile" not defined`},
		"printf (builtin, unsafe)": {`{{ printf "%0999999d" 1 }}`, `function "printf" is not allowed`},
		"print":                    {`{{ print .db.a }}`, `function "print" is not allowed`},
		"call":                     {`{{ call .db.a }}`, `function "call" is not allowed`},
		"slice":                    {`{{ slice .db.a 1 }}`, `function "slice" is not allowed`},
		"html":                     {`{{ html .db.a }}`, `function "html" is not allowed`},
		"range over int":           {`{{ range 1000000000 }}x{{ end }}`, "range is not allowed"},
		"range":                    {`{{ range list .db.a }}{{ . }}{{ end }}`, "range is not allowed"},
		"define":                   {`{{ define "x" }}{{ .db.a }}{{ end }}{{ .db.a }}`, "define and block are not allowed"},
		"block":                    {`{{ block "x" . }}{{ .db.a }}{{ end }}`, "not allowed"},
		"template":                 {`{{ template "x" }}`, "not allowed"},
		"dot alone":                {`{{ . }}`, "dot alone is the whole data"},
		"a ref alone":              {`{{ .db }}`, ".db alone is not allowed"},
		"$ alone":                  {`{{ $ }}`, "name a key"},
		"$.db alone":               {`{{ $.db }}`, "name a key"},
		"field of a value":         {`{{ .db.a.b }}`, "has no fields"},
		"field of a variable":      {`{{ $x := .db.a }}{{ $x.b }}`, "has no fields"},
		"chain":                    {`{{ (index .db "a").b }}`, "fields of a result are not allowed"},
		"field inside with":        {`{{ with .db.a }}{{ .db.b }}{{ end }}`, "inside with, dot is the with's value"},
		"index of a value":         {`{{ index .db.a "x" }}`, `index takes the form`},
		"index with a variable":    {`{{ $k := .db.a }}{{ index .db $k }}`, `KEY a quoted constant`},
		"index piped":              {`{{ "a" | index .db }}`, `index takes`},
		"too few arguments":        {`{{ b64enc }}`, "b64enc takes 1 argument, not 0"},
		"too many arguments":       {`{{ b64enc .db.a .db.b }}`, "b64enc takes 1 argument, not 2"},
		"piped too many":           {`{{ .db.a | b64enc .db.b }}`, "b64enc takes 1 argument, not 2"},
		"urlquery is Keyward's":    {`{{ urlquery .db.a .db.b }}`, "urlquery takes 1 argument, not 2"},
		"number for text":          {`{{ b64enc 5 }}`, "argument 1 of b64enc must be text"},
		"arguments to a value":     {`{{ .db.a "x" }}`, "is not a function"},
		"break":                    {`{{ break }}`, "break"},
		"parse error":              {`{{ .db.a `, "line 1"},
		"oversize":                 {strings.Repeat("x", MaxTemplateBytes+1), "max 16384"},
		"not UTF-8":                {"\xff{{ .db.a }}", "not UTF-8"},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := Parse(tc.src, dbNames)
			if !errors.Is(err, fault.ErrInvalid) || !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("err = %v, want InvalidArgument mentioning %q", err, tc.msg)
			}
		})
	}
	_, err := Parse("ab\n{{ .db.a }}{{ .nope.b }}", dbNames)
	if err == nil || !strings.Contains(err.Error(), "line 2, column ") {
		t.Fatalf("the error does not say where: %v", err)
	}
}

// The inputs are every (name, key) the template reads, however it reads them, and only those.
func TestParseCollectsInputs(t *testing.T) {
	tp, err := Parse(`{{ $u := .db.user }}{{ with .db.host }}{{ . }}:{{ $.db.port }}{{ else }}{{ index $.tls "tls.crt" }}{{ end }}`+
		`{{ if and .db.a (not .db.b) }}{{ $u | b64enc }}{{ end }}{{ index .tls "tls.key" }}{{ (join "," (list .db.c)) }}`, dbNames)
	if err != nil {
		t.Fatal(err)
	}
	got := fmt.Sprint(tp.Inputs())
	if want := "[.db.a .db.b .db.c .db.host .db.port .db.user .tls.tls.crt .tls.tls.key]"; got != want {
		t.Fatalf("inputs %s, want %s", got, want)
	}
}

// The documented set is the set a template can call: every name in Funcs is callable, and nothing
// else is.
func TestFuncsAreDocumented(t *testing.T) {
	documented := map[string]bool{}
	for _, f := range Funcs {
		documented[f.Name] = true
		if !strings.HasPrefix(f.Usage, f.Name) || f.Doc == "" {
			t.Errorf("%s: usage %q, doc %q", f.Name, f.Usage, f.Doc)
		}
	}
	callable := map[string]bool{}
	for name := range funcs(nil) {
		callable[name] = true
	}
	for name := range builtinArity {
		callable[name] = true
	}
	if fmt.Sprint(documented) != fmt.Sprint(callable) {
		t.Fatalf("documented %v, callable %v", documented, callable)
	}
}

func data() map[string]map[string]string {
	return map[string]map[string]string{
		"db":  {"user": "app", "password": canary, "host": "db.internal", "b64": "aGVsbG8=", "der": "\x30\x03\x02\x01\x05", "nl": "  v\n"},
		"tls": {"tls.crt": "CRT"},
	}
}

func render(t *testing.T, src string, limit int64) (string, error) {
	t.Helper()
	tp, err := Parse(src, dbNames)
	if err != nil {
		t.Fatal(err)
	}
	out, err := tp.Execute(data(), limit)
	return string(out), err
}

// Each documented function renders as documented.
func TestExecuteRenders(t *testing.T) {
	for src, want := range map[string]string{
		`postgresql://{{ userinfo .db.user .db.password }}@{{ .db.host }}:5432/app`: `postgresql://app:CANARY-s3cr3t%3Ap%40ss%2F%27word@db.internal:5432/app`,
		`{{ .db.host }}:5432:*:{{ .db.user }}:{{ pgpass .db.password }}`:            `db.internal:5432:*:app:CANARY-s3cr3t\:p@ss/'word`,
		`PASSWORD={{ shquote .db.password }}`:                                       `PASSWORD='CANARY-s3cr3t:p@ss/'\''word'`,
		`{"password": {{ json .db.password }}}`:                                     `{"password": "CANARY-s3cr3t:p@ss/'word"}`,
		`{{ quote .db.password }}`:                                                  `"CANARY-s3cr3t:p@ss/'word"`,
		`?p={{ .db.password | urlquery }}`:                                          `?p=CANARY-s3cr3t%3Ap%40ss%2F%27word`,
		`{{ b64dec .db.b64 }}|{{ b64enc "hello" }}|{{ b64dec "aGVsbG8" }}`:          `hello|aGVsbG8=|hello`,
		`{{ pem "CERTIFICATE" .db.der }}`:                                           "-----BEGIN CERTIFICATE-----\nMAMCAQU=\n-----END CERTIFICATE-----\n",
		`{{ join ", " (list .db.user .db.host "x") }}`:                              `app, db.internal, x`,
		`[{{ trim .db.nl }}]{{ replace "." "-" .db.host }}`:                         `[v]db-internal`,
		`{{ index .tls "tls.crt" }}{{ len .db.user }}`:                              `CRT3`,
		`{{ with .db.host }}{{ . }}{{ end }}{{ if eq .db.user "app" "x" }}!{{ end }}{{ if ne .db.user "app" }}?{{ end }}`: `db.internal!`,
		`{{ $p := .db.password }}{{ if not $p }}empty{{ else }}{{ or .db.nl $p | trim }}{{ end }}`:                        `v`,
		`{{ if and .db.user .db.host }}{{ and .db.user .db.host }}{{ end }}`:                                              `db.internal`,
	} {
		got, err := render(t, src, 1<<20)
		if err != nil || got != want {
			t.Errorf("%s:\n got %q, %v\nwant %q", src, got, err, want)
		}
	}
}

// The output is bounded by the limit, and what functions allocate by a budget: neither a long
// output nor a chain of functions that doubles a value each step gets far.
func TestExecuteBoundsOutputAndAllocations(t *testing.T) {
	if _, err := render(t, `{{ .db.password }}{{ .db.password }}`, int64(len(canary))+5); !errors.Is(err, fault.ErrTooLarge) || !strings.Contains(err.Error(), "the output exceeds its limit of 29 bytes") {
		t.Fatalf("output past the limit: %v", err)
	}
	if out, err := render(t, `{{ .db.password }}`, int64(len(canary))); err != nil || out != canary {
		t.Fatalf("output at the limit: %q %v", out, err)
	}
	var b strings.Builder
	b.WriteString(`{{ $a := .db.password }}`)
	for range 60 { // 2^60 times the value, if nothing stopped it
		b.WriteString(`{{ $a = join "" (list $a $a) }}`)
	}
	b.WriteString(`{{ len $a }}`)
	start := time.Now()
	if _, err := render(t, b.String(), 1<<20); !errors.Is(err, fault.ErrTooLarge) || !strings.Contains(err.Error(), "join: the results of the template's functions exceed their budget") {
		t.Fatalf("doubling chain: %v", err)
	}
	if _, err := render(t, `{{ $a := replace "" .db.password .db.password }}{{ $a = replace "" $a $a }}{{ $a = replace "" $a $a }}{{ len $a }}`, 1<<20); !errors.Is(err, fault.ErrTooLarge) {
		t.Fatalf("replace with an empty OLD: %v", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("the bounded renders took %s", d)
	}
}

// An execution error says where and which function refused, and never holds a value: not from
// Keyward's functions, and not from whatever text/template says (which sanitize drops).
func TestExecuteErrorsHoldNoValue(t *testing.T) {
	for src, msg := range map[string]string{
		`x{{ b64dec .db.password }}`:                 "line 1, column 4: b64dec: the value is not standard base64",
		`{{ pem .db.password .db.user }}`:            "pem: the type",
		`{{ b64enc (list .db.password) }}`:           "the template cannot be executed on these values",
		`{{ if eq (list .db.password) 1 }}{{ end }}`: "the template cannot be executed on these values",
	} {
		_, err := render(t, src, 1<<20)
		if !errors.Is(err, fault.ErrInvalid) || !strings.Contains(err.Error(), msg) || strings.Contains(err.Error(), "CANARY") {
			t.Errorf("%s: %v, want InvalidArgument with %q and no value", src, err, msg)
		}
	}
	// What text/template might say, with a value in it: only the place is kept.
	err := sanitize(template.ExecError{Name: "template", Err: errors.New(`template: template:3:14: executing "template" at <x>: error calling x: ` + canary)}, 10)
	if strings.Contains(err.Error(), "CANARY") || !strings.Contains(err.Error(), "line 3, column 14") || !errors.Is(err, fault.ErrInvalid) {
		t.Fatalf("sanitized: %v", err)
	}
}

type panicWriter struct{}

func (panicWriter) Write([]byte) (int, error) { panic(canary) }

// A panic inside an execution (text/template re-panics what is not its own) is an error that says
// nothing of it.
func TestExecuteRecoversPanics(t *testing.T) {
	tp, err := Parse(`{{ .db.password }}`, dbNames)
	if err != nil {
		t.Fatal(err)
	}
	err = tp.execute(data(), 1<<20, panicWriter{})
	if err == nil || strings.Contains(err.Error(), "CANARY") {
		t.Fatalf("panic: %v", err)
	}
}

// Many renders of one parsed template at once share nothing but the parse (go test -race).
func TestExecuteIsSafeConcurrently(t *testing.T) {
	tp, err := Parse(`{{ .db.user }}:{{ b64enc .db.password }}`, dbNames)
	if err != nil {
		t.Fatal(err)
	}
	errs := make(chan error, 8)
	for range 8 {
		go func() {
			out, err := tp.Execute(data(), 1<<10)
			if err == nil && !strings.HasPrefix(string(out), "app:") {
				err = fmt.Errorf("rendered %q", out)
			}
			errs <- err
		}()
	}
	for range 8 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
}

// The output buffer clears every array it outgrows: only the returned bytes hold the output.
func TestOutputClearsWhatItOutgrows(t *testing.T) {
	o := &output{max: 1 << 20}
	o.Write([]byte(strings.Repeat("s", 400)))
	first := o.buf[:cap(o.buf)]
	o.Write([]byte(strings.Repeat("t", 400)))
	if strings.Contains(string(first), "s") {
		t.Fatal("the outgrown array still holds the output")
	}
	if len(o.buf) != 800 {
		t.Fatalf("%d bytes", len(o.buf))
	}
}
