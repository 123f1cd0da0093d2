package render

import (
	"errors"
	"fmt"
	"io"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"text/template"
	"text/template/parse"
	"unicode/utf8"

	"github.com/keyward/keyward/internal/fault"
)

// Limits of templates.
const (
	// MaxTemplateBytes bounds a template's source.
	MaxTemplateBytes = 16 << 10
	// funcSlack is what an execution's functions may allocate beyond its output limit.
	funcSlack = 64 << 10
)

// Input is one value a template reads: the key Key of the secret the template calls Name.
type Input struct{ Name, Key string }

func (in Input) String() string { return "." + in.Name + "." + in.Key }

// Template is a parsed and checked template; safe for concurrent use.
type Template struct {
	t      *template.Template
	inputs []Input
}

var nameRE = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]{0,63}$`)

// ValidName reports whether name can name a secret in a template (.NAME.KEY): an identifier of at
// most 64 bytes.
func ValidName(name string) bool { return nameRE.MatchString(name) }

// Parse parses src and checks it (see the package doc). names are the names it may read from: a
// name it reads that is not among them is an error. Errors wrap fault.ErrInvalid and quote only the
// template.
func Parse(src string, names map[string]bool) (tp *Template, err error) {
	if len(src) > MaxTemplateBytes {
		return nil, fmt.Errorf("the template is %d bytes (max %d): %w", len(src), MaxTemplateBytes, fault.ErrInvalid)
	}
	if !utf8.ValidString(src) {
		return nil, fmt.Errorf("the template is not UTF-8: %w", fault.ErrInvalid)
	}
	defer func() {
		if r := recover(); r != nil { // text/template recovers its own; this is the last line
			tp, err = nil, fmt.Errorf("the template could not be parsed: %w", fault.ErrInvalid)
		}
	}()
	t, err := template.New("template").Option("missingkey=error").Funcs(funcs(nil)).Parse(src)
	if err != nil {
		msg := strings.TrimPrefix(strings.TrimPrefix(err.Error(), "template: "), "template:")
		return nil, fmt.Errorf("line %s: %w", fault.Truncate(msg, 240), fault.ErrInvalid)
	}
	if len(t.Templates()) > 1 {
		return nil, fmt.Errorf("define and block are not allowed: a template is one file: %w", fault.ErrInvalid)
	}
	if t.Tree == nil || t.Tree.Root == nil {
		return nil, fmt.Errorf("the template is empty: %w", fault.ErrInvalid)
	}
	w := &walker{tree: t.Tree, names: names, inputs: map[Input]bool{}, sigs: signatures()}
	w.list(t.Tree.Root, true)
	if w.err != nil {
		return nil, fmt.Errorf("%w: %w", w.err, fault.ErrInvalid)
	}
	tp = &Template{t: t}
	for in := range w.inputs {
		tp.inputs = append(tp.inputs, in)
	}
	slices.SortFunc(tp.inputs, func(a, b Input) int { return strings.Compare(a.String(), b.String()) })
	return tp, nil
}

// Inputs are the values the template reads, sorted: the only ones it can read.
func (t *Template) Inputs() []Input { return slices.Clone(t.inputs) }

// errOutput is the output writer's refusal past its limit.
var errOutput = errors.New("output limit")

// output is the bounded buffer a template writes into. It clears the arrays it outgrows, so no copy
// of the rendered bytes is left behind but the one returned.
type output struct {
	buf []byte
	max int64
}

func (o *output) Write(p []byte) (int, error) {
	n := len(o.buf) + len(p)
	if int64(n) > o.max {
		return 0, errOutput
	}
	if n > cap(o.buf) {
		nb := make([]byte, len(o.buf), int(min(max(int64(2*cap(o.buf)), int64(n), 512), o.max)))
		copy(nb, o.buf)
		clear(o.buf)
		o.buf = nb
	}
	o.buf = append(o.buf, p...)
	return len(p), nil
}

var locationRE = regexp.MustCompile(`^template: template:(\d+):(\d+): `)

// Execute renders t over data, where data[NAME][KEY] is the value of each Input. The output is at
// most limit bytes, and the functions may allocate about as much again (every result is charged);
// past either, the error wraps fault.ErrTooLarge. A function that refuses a value (b64dec of text
// that is not base64) or a value of the wrong kind is an error wrapping fault.ErrInvalid that says
// where and which function, never the value. The output is the caller's, to clear after use.
func (t *Template) Execute(data map[string]map[string]string, limit int64) ([]byte, error) {
	o := &output{max: limit}
	if err := t.execute(data, limit, o); err != nil {
		clear(o.buf)
		return nil, err
	}
	return o.buf, nil
}

func (t *Template) execute(data map[string]map[string]string, limit int64, w io.Writer) (err error) {
	defer func() {
		if r := recover(); r != nil { // text/template re-panics what is not its own
			err = errors.New("rendering failed (a panic; nothing of it is reported)")
		}
	}()
	tt, err := t.t.Clone()
	if err != nil {
		return fmt.Errorf("rendering: %v", err)
	}
	tt.Funcs(funcs(&budget{left: limit + funcSlack}))
	if err := tt.Execute(w, data); err != nil {
		return sanitize(err, limit)
	}
	return nil
}

// sanitize turns an execution error into one that says where and why, from what Keyward wrote
// itself: a function's refusal or the output limit. Anything else text/template says is dropped,
// since its messages are not ours to vouch for.
func sanitize(err error, limit int64) error {
	loc := ""
	if m := locationRE.FindStringSubmatch(err.Error()); m != nil {
		loc = "line " + m[1] + ", column " + m[2] + ": "
	}
	var fe *funcError
	switch {
	case errors.Is(err, errOutput):
		return fmt.Errorf("the output exceeds its limit of %d bytes: %w", limit, fault.ErrTooLarge)
	case errors.As(err, &fe) && fe.tooLarge:
		return fmt.Errorf("%s%s: %w", loc, fe.msg, fault.ErrTooLarge)
	case errors.As(err, &fe):
		return fmt.Errorf("%s%s: %w", loc, fe.msg, fault.ErrInvalid)
	}
	return fmt.Errorf("%sthe template cannot be executed on these values (an argument of the wrong kind, such as a list where text is expected): %w", loc, fault.ErrInvalid)
}

// signatures are the types of the functions a template may call (Keyward's; the builtins are
// checked by builtinArity).
func signatures() map[string]reflect.Type {
	m := map[string]reflect.Type{}
	for name, f := range funcs(nil) {
		m[name] = reflect.TypeOf(f)
	}
	return m
}

// walker checks a parse tree and collects the inputs it reads. dot is the data (root) at the top
// and in else branches; inside a with, dot is the with's value.
type walker struct {
	tree   *parse.Tree
	names  map[string]bool
	inputs map[Input]bool
	sigs   map[string]reflect.Type
	err    error
}

func (w *walker) fail(n parse.Node, format string, args ...any) {
	if w.err == nil {
		w.err = fmt.Errorf("%s: %s", w.at(n), fmt.Sprintf(format, args...))
	}
}

// at is n's place, as "line L, column C" of the template.
func (w *walker) at(n parse.Node) string {
	loc, _ := w.tree.ErrorContext(n)
	if _, rest, ok := strings.Cut(loc, ":"); ok {
		line, col, _ := strings.Cut(rest, ":")
		return "line " + line + ", column " + col
	}
	return loc
}

func (w *walker) list(l *parse.ListNode, root bool) {
	if l == nil {
		return
	}
	for _, n := range l.Nodes {
		w.node(n, root)
	}
}

func (w *walker) node(n parse.Node, root bool) {
	switch n := n.(type) {
	case *parse.TextNode, *parse.CommentNode:
	case *parse.ActionNode:
		w.pipe(n.Pipe, root)
	case *parse.IfNode:
		w.pipe(n.Pipe, root)
		w.list(n.List, root)
		w.list(n.ElseList, root)
	case *parse.WithNode:
		w.pipe(n.Pipe, root)
		w.list(n.List, false)
		w.list(n.ElseList, root)
	case *parse.RangeNode:
		w.fail(n, "range is not allowed (a template has no loops; join a list instead)")
	case *parse.TemplateNode:
		w.fail(n, "template and block are not allowed (a template is one file)")
	case *parse.BreakNode, *parse.ContinueNode:
		w.fail(n, "break and continue are not allowed")
	default:
		w.fail(n, "%s is not allowed", n)
	}
}

func (w *walker) pipe(p *parse.PipeNode, root bool) {
	if p == nil {
		return
	}
	for i, c := range p.Cmds {
		w.command(c, root, i > 0)
	}
}

// command checks one command of a pipeline; piped says the previous command's result is passed as
// its last argument.
func (w *walker) command(c *parse.CommandNode, root, piped bool) {
	id, ok := c.Args[0].(*parse.IdentifierNode)
	if !ok {
		if len(c.Args) > 1 || piped {
			w.fail(c, "%s is not a function: it takes no arguments", c.Args[0])
			return
		}
		w.operand(c.Args[0], root)
		return
	}
	nargs := len(c.Args) - 1
	if piped {
		nargs++
	}
	if !w.call(id, nargs) {
		return
	}
	if id.Ident == "index" {
		w.index(c, root, piped)
		return
	}
	sig := w.sigs[id.Ident]
	for i, a := range c.Args[1:] {
		if sig != nil {
			want := sig.In(min(i, sig.NumIn()-1))
			if sig.IsVariadic() && i >= sig.NumIn()-1 {
				want = want.Elem()
			}
			switch a.(type) {
			case *parse.NumberNode, *parse.BoolNode, *parse.NilNode:
				if want.Kind() == reflect.String {
					w.fail(a, "argument %d of %s must be text, not %s", i+1, id.Ident, a)
				}
			}
		}
		w.operand(a, root)
	}
}

// call checks that a function may be called with nargs arguments.
func (w *walker) call(id *parse.IdentifierNode, nargs int) bool {
	if ar, ok := builtinArity[id.Ident]; ok {
		if nargs < ar[0] || (ar[1] >= 0 && nargs > ar[1]) {
			w.fail(id, "%s takes %s, not %d", id.Ident, arity(ar[0], ar[1]), nargs)
			return false
		}
		return true
	}
	sig, ok := w.sigs[id.Ident]
	if !ok {
		names := make([]string, 0, len(Funcs))
		for _, f := range Funcs {
			names = append(names, f.Name)
		}
		w.fail(id, "function %q is not allowed (the functions are %s)", id.Ident, strings.Join(names, ", "))
		return false
	}
	lo, hi := sig.NumIn(), sig.NumIn()
	if sig.IsVariadic() {
		lo, hi = lo-1, -1
	}
	if nargs < lo || (hi >= 0 && nargs > hi) {
		w.fail(id, "%s takes %s, not %d", id.Ident, arity(lo, hi), nargs)
		return false
	}
	return true
}

func arity(lo, hi int) string {
	switch {
	case lo == hi && lo == 1:
		return "1 argument"
	case lo == hi:
		return fmt.Sprintf("%d arguments", lo)
	case hi < 0:
		return fmt.Sprintf("at least %d arguments", lo)
	}
	return fmt.Sprintf("%d to %d arguments", lo, hi)
}

// index allows one form: index .NAME "KEY" (or $.NAME), for keys that are not identifiers.
func (w *walker) index(c *parse.CommandNode, root, piped bool) {
	if piped || len(c.Args) != 3 {
		w.fail(c, `index takes the form index .NAME "KEY"`)
		return
	}
	key, ok := c.Args[2].(*parse.StringNode)
	if !ok {
		w.fail(c, `index takes the form index .NAME "KEY", with KEY a quoted constant`)
		return
	}
	switch a := c.Args[1].(type) {
	case *parse.FieldNode:
		if !root {
			w.fail(a, `inside with, dot is the with's value: write index $.%s "KEY"`, strings.Join(a.Ident, "."))
			return
		}
		if len(a.Ident) == 1 {
			w.read(a, a.Ident[0], key.Text)
			return
		}
	case *parse.VariableNode:
		if len(a.Ident) == 2 && a.Ident[0] == "$" {
			w.read(a, a.Ident[1], key.Text)
			return
		}
	}
	w.fail(c, `index takes the form index .NAME "KEY"`)
}

// operand checks an argument (or a lone command): how it reads the data.
func (w *walker) operand(n parse.Node, root bool) {
	switch n := n.(type) {
	case *parse.FieldNode:
		switch {
		case !root:
			w.fail(n, "inside with, dot is the with's value: read keys as $.%s", strings.Join(n.Ident, "."))
		case len(n.Ident) == 2:
			w.read(n, n.Ident[0], n.Ident[1])
		case len(n.Ident) == 1:
			w.fail(n, `.%[1]s alone is not allowed: name a key, .%[1]s.KEY (or index .%[1]s "KEY")`, n.Ident[0])
		default:
			w.fail(n, "%s: a key's value is text, it has no fields", n)
		}
	case *parse.VariableNode:
		switch {
		case n.Ident[0] == "$" && len(n.Ident) == 3:
			w.read(n, n.Ident[1], n.Ident[2])
		case n.Ident[0] == "$":
			w.fail(n, "%s: name a key, $.NAME.KEY", n)
		case len(n.Ident) > 1:
			w.fail(n, "%s: a variable holds text, it has no fields", n)
		}
	case *parse.DotNode:
		if root {
			w.fail(n, "dot alone is the whole data: name a key, .NAME.KEY")
		}
	case *parse.ChainNode:
		w.fail(n, "%s: fields of a result are not allowed", n)
	case *parse.PipeNode:
		if len(n.Decl) > 0 {
			w.fail(n, "a variable declared inside parentheses is not allowed")
			return
		}
		w.pipe(n, root)
	case *parse.IdentifierNode:
		w.call(n, 0)
	case *parse.StringNode, *parse.NumberNode, *parse.BoolNode, *parse.NilNode:
	default:
		w.fail(n, "%s is not allowed", n)
	}
}

// read records that the template reads key of name.
func (w *walker) read(n parse.Node, name, key string) {
	if !w.names[name] {
		w.fail(n, "%q is not one of the entry's refs", name)
		return
	}
	if key == "" {
		w.fail(n, "empty key")
		return
	}
	w.inputs[Input{Name: name, Key: key}] = true
}
