package harness

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net/url"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// Postgres is a PostgreSQL server from Debian's packages, initialised in its own directory and
// listening only on 127.0.0.1. It is a test server only: fsync is off and the superuser's password
// sits in memory in this struct.
type Postgres struct {
	Host string // 127.0.0.1
	Port int
	// URL is postgres://127.0.0.1:PORT/postgres?sslmode=disable, without credentials: connect with
	// User and Password (Connect does).
	URL string
	// User and Password are the superuser's (test-only: a random password per server, never logged
	// and never written to disk after initdb has read it).
	User     string
	Password string
	Dir      string
	proc     *process
}

// postgresSuperuser is the name initdb gives the superuser.
const postgresSuperuser = "keyward"

// postgresBinDir is the bin directory of the highest PostgreSQL version Debian's packages installed
// (/usr/lib/postgresql/<major>/bin), or an error wrapping ErrMissing.
func postgresBinDir() (string, error) {
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	type found struct {
		dir     string
		version float64
	}
	var ok []found
	for _, d := range dirs {
		v, err := strconv.ParseFloat(filepath.Base(filepath.Dir(d)), 64)
		if err != nil {
			continue
		}
		if postgresBinsPresent(d) {
			ok = append(ok, found{d, v})
		}
	}
	if len(ok) == 0 {
		return "", fmt.Errorf("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin with initdb and postgres; Debian's postgresql): run `make deps` or `test/tools/install-debs.sh`: %w", ErrMissing)
	}
	sort.Slice(ok, func(i, j int) bool { return ok[i].version > ok[j].version })
	return ok[0].dir, nil
}

func postgresBinsPresent(dir string) bool {
	for _, b := range []string{"initdb", "postgres"} {
		if st, err := os.Stat(filepath.Join(dir, b)); err != nil || st.Mode()&0o111 == 0 {
			return false
		}
	}
	return true
}

// postgresCredential is who initdb and postgres run as: PostgreSQL refuses to run as root, so as
// root it is Debian's postgres system user (or nobody); otherwise nil (the current user).
func postgresCredential() (*syscall.Credential, error) {
	if os.Geteuid() != 0 {
		return nil, nil
	}
	var errs []error
	for _, name := range []string{"postgres", "nobody"} {
		u, err := user.Lookup(name)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		uid, err1 := strconv.ParseUint(u.Uid, 10, 32)
		gid, err2 := strconv.ParseUint(u.Gid, 10, 32)
		if err1 != nil || err2 != nil {
			errs = append(errs, fmt.Errorf("user %s: uid %q gid %q", name, u.Uid, u.Gid))
			continue
		}
		return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid), NoSetGroups: true}, nil
	}
	return nil, fmt.Errorf("PostgreSQL cannot run as root and neither the postgres nor the nobody user exists: %w", errors.Join(errs...))
}

// StartPostgres initialises a cluster in dir (which must exist) with a random superuser password and
// starts postgres on a free port of 127.0.0.1 (its unix socket in dir too), waiting until the
// superuser can run a query. As root, dir is handed to the postgres user; its ancestors must be
// traversable by that user: those under the temporary directory are made so (o+x, never o+r).
func StartPostgres(ctx context.Context, dir string) (*Postgres, error) {
	bin, err := postgresBinDir()
	if err != nil {
		return nil, err
	}
	cred, err := postgresCredential()
	if err != nil {
		return nil, err
	}
	if cred != nil {
		if err := handOver(dir, cred); err != nil {
			return nil, err
		}
	}
	port, err := FreePort()
	if err != nil {
		return nil, err
	}
	pg := &Postgres{Host: "127.0.0.1", Port: port, User: postgresSuperuser, Password: randomHex(24), Dir: dir,
		URL: (&url.URL{Scheme: "postgres", Host: hostPort(port), Path: "/postgres", RawQuery: "sslmode=disable"}).String()}
	data, sock := filepath.Join(dir, "data"), filepath.Join(dir, "sock")
	if err := pg.initdb(ctx, bin, data, cred); err != nil {
		return nil, err
	}
	if err := mkdirOwned(sock, cred); err != nil {
		return nil, err
	}
	p, err := startProcessAs("postgres", dir, filepath.Join(bin, "postgres"), []string{
		"-D", data, "-p", strconv.Itoa(port),
		"-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories=" + sock,
		"-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
		// A failed statement is logged with its text by default: a CREATE ROLE ... PASSWORD would put
		// a credential in the log.
		"-c", "log_min_error_statement=panic", "-c", "logging_collector=off",
		"-c", "max_connections=50", "-c", "shared_buffers=16MB",
	}, []string{"LC_ALL=C"}, cred)
	if err != nil {
		return nil, err
	}
	pg.proc = p
	if err := p.waitReady(ctx, func(ctx context.Context) error { return pg.CanLogin(ctx, pg.User, pg.Password) }); err != nil {
		pg.Stop()
		return nil, err
	}
	return pg, nil
}

// PostgresT starts PostgreSQL for this test (StartPostgres) and stops it when the test ends.
func PostgresT(tb testing.TB) *Postgres {
	tb.Helper()
	return startT(tb, "postgres", StartPostgres)
}

// initdb creates the cluster in data, its superuser's password read from a file removed right after.
func (pg *Postgres) initdb(ctx context.Context, bin, data string, cred *syscall.Credential) error {
	pwfile := filepath.Join(pg.Dir, "initdb.pw")
	if err := os.WriteFile(pwfile, []byte(pg.Password+"\n"), 0o600); err != nil {
		return err
	}
	defer os.Remove(pwfile)
	if err := chownTo(pwfile, cred); err != nil {
		return err
	}
	logPath := filepath.Join(pg.Dir, "initdb.log")
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer logFile.Close()
	cmd := exec.CommandContext(ctx, filepath.Join(bin, "initdb"), "-D", data, "-U", pg.User, "--pwfile="+pwfile,
		"--auth-local=scram-sha-256", "--auth-host=scram-sha-256", "--encoding=UTF8", "--locale=C", "--no-sync")
	cmd.Dir = pg.Dir
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL, Credential: cred}
	if err := cmd.Run(); err != nil {
		tail, _ := os.ReadFile(logPath)
		return fmt.Errorf("initdb: %w; log %s:\n%s", err, logPath, lastLines(string(tail), 20))
	}
	return nil
}

// handOver makes dir owned by cred's user and dir's ancestors traversable by it.
func handOver(dir string, cred *syscall.Credential) error {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return err
	}
	if err := chownTo(abs, cred); err != nil {
		return err
	}
	tmp := filepath.Clean(os.TempDir())
	for d := filepath.Dir(abs); d != "/"; d = filepath.Dir(d) {
		st, err := os.Stat(d)
		if err != nil {
			return err
		}
		if traversable(st, cred) {
			continue
		}
		if !strings.HasPrefix(d, tmp+"/") {
			return fmt.Errorf("postgres runs as uid %d, which cannot enter %s: start it in a directory under %s", cred.Uid, d, tmp)
		}
		if err := os.Chmod(d, st.Mode().Perm()|0o001); err != nil {
			return err
		}
	}
	return nil
}

func traversable(st fs.FileInfo, cred *syscall.Credential) bool {
	sys, ok := st.Sys().(*syscall.Stat_t)
	if !ok {
		return false
	}
	perm := st.Mode().Perm()
	switch {
	case sys.Uid == cred.Uid:
		return perm&0o100 != 0
	case sys.Gid == cred.Gid:
		return perm&0o010 != 0
	default:
		return perm&0o001 != 0
	}
}

func chownTo(path string, cred *syscall.Credential) error {
	if cred == nil {
		return nil
	}
	return os.Chown(path, int(cred.Uid), int(cred.Gid))
}

func mkdirOwned(path string, cred *syscall.Credential) error {
	if err := os.Mkdir(path, 0o700); err != nil {
		return err
	}
	return chownTo(path, cred)
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// Stop shuts postgres down fast (SIGINT: clients are disconnected, no checkpoint wait), kills its
// process group after 10 s, and in any case kills whatever of the group is left (backends). Safe to
// call twice.
func (pg *Postgres) Stop() {
	p := pg.proc
	if p == nil {
		return
	}
	if !p.exited() {
		_ = p.cmd.Process.Signal(syscall.SIGINT)
		select {
		case <-p.done:
		case <-time.After(10 * time.Second):
		}
	}
	_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
	<-p.done
}

// Pid is the postmaster's process ID, which is also its process group's.
func (pg *Postgres) Pid() int { return pg.proc.pid() }

// Connect opens a connection to the postgres database as user with password.
func (pg *Postgres) Connect(ctx context.Context, user, password string) (*pgx.Conn, error) {
	cfg, err := pgx.ParseConfig(pg.URL)
	if err != nil {
		return nil, err
	}
	cfg.User, cfg.Password = user, password
	cfg.ConnectTimeout = 5 * time.Second
	cfg.Fallbacks = nil
	return pgx.ConnectConfig(ctx, cfg)
}

// CanLogin connects as user with password and runs SELECT 1: nil proves the credential works.
func (pg *Postgres) CanLogin(ctx context.Context, user, password string) error {
	conn, err := pg.Connect(ctx, user, password)
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	var one int
	if err := conn.QueryRow(ctx, "SELECT 1").Scan(&one); err != nil {
		return err
	}
	if one != 1 {
		return fmt.Errorf("SELECT 1 as %s returned %d", user, one)
	}
	return nil
}

// RoleExists reports whether a role (user) named name exists, asking as the superuser.
func (pg *Postgres) RoleExists(ctx context.Context, name string) (bool, error) {
	conn, err := pg.Connect(ctx, pg.User, pg.Password)
	if err != nil {
		return false, err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	var exists bool
	err = conn.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)", name).Scan(&exists)
	return exists, err
}
