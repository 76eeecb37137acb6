package embedfleet

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"math"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// cacheEntryCase is one case of schemas/testdata/cache_entries.json, which the Python readers
// (schemas/cache_layout.py servable_entry) are tested against too.
type cacheEntryCase struct {
	Name      string            `json:"name"`
	Model     string            `json:"model"`
	Dim       int               `json:"dim"`
	RedisType string            `json:"redis_type"`
	FieldsHex map[string]string `json:"fields_hex"`
	Servable  bool              `json:"servable"`
	Tokens    *int              `json:"tokens"`
	Vector    []float64         `json:"vector"`
}

func cacheEntryCases(t *testing.T) []cacheEntryCase {
	t.Helper()
	var file struct {
		Fields []string         `json:"fields"`
		Cases  []cacheEntryCase `json:"cases"`
	}
	readJSON(t, "cache_entries.json", &file)
	if strings.Join(file.Fields, ",") != strings.Join(EntryFields, ",") {
		t.Fatalf("EntryFields %v, the file's %v", EntryFields, file.Fields)
	}
	if len(file.Cases) < 40 {
		t.Fatalf("only %d cases", len(file.Cases))
	}
	return file.Cases
}

func (c cacheEntryCase) fields(t *testing.T) map[string][]byte {
	t.Helper()
	out := map[string][]byte{}
	for name, h := range c.FieldsHex {
		raw, err := hex.DecodeString(h)
		if err != nil {
			t.Fatalf("%s: %v", c.Name, err)
		}
		out[name] = raw
	}
	return out
}

// hmget is what an HMGET of EntryFields returns for the case (all nil for no hash at the key).
func (c cacheEntryCase) hmget(t *testing.T) []any {
	values := make([]any, len(EntryFields))
	if c.RedisType != "hash" {
		return values
	}
	fields := c.fields(t)
	for i, name := range EntryFields {
		if raw, ok := fields[name]; ok {
			values[i] = string(raw)
		}
	}
	return values
}

func checkServed(t *testing.T, c cacheEntryCase, vector []float32) {
	t.Helper()
	if len(vector) != len(c.Vector) {
		t.Fatalf("%s: %d floats, want %d", c.Name, len(vector), len(c.Vector))
	}
	for i, want := range c.Vector {
		got := float64(vector[i])
		if got != want || math.Signbit(got) != math.Signbit(want) {
			t.Fatalf("%s: [%d] = %v, want %v", c.Name, i, got, want)
		}
	}
}

func TestCacheEntriesServable(t *testing.T) {
	for _, c := range cacheEntryCases(t) {
		entry, ok := ServableEntry(c.hmget(t), c.Model, c.Dim)
		if ok != c.Servable || ok != strings.HasPrefix(c.Name, "good") {
			t.Errorf("%s: servable %v, the file says %v", c.Name, ok, c.Servable)
			continue
		}
		if !ok {
			continue
		}
		checkServed(t, c, entry.Vector)
		if entry.TokensKnown != (c.Tokens != nil) || (c.Tokens != nil && entry.Tokens != *c.Tokens) {
			t.Errorf("%s: tokens %d (known %v), want %v", c.Name, entry.Tokens, entry.TokensKnown, c.Tokens)
		}
	}
}

func TestServableEntryRefusesOtherShapes(t *testing.T) {
	good := []any{string([]byte{0, 0, 128, 63}), "m", "1", "2"}
	if _, ok := ServableEntry(good, "m", 1); !ok {
		t.Fatal("the good entry is refused")
	}
	if entry, ok := ServableEntry([]any{[]byte{0, 0, 128, 63}, []byte("m"), []byte("1"), nil}, "m", 1); !ok || entry.Vector[0] != 1 || entry.TokensKnown {
		t.Errorf("[]byte fields: %+v %v", entry, ok)
	}
	for name, values := range map[string][]any{
		"three fields": good[:3],
		"a number":     {good[0], "m", 1, "2"},
	} {
		if _, ok := ServableEntry(values, "m", 1); ok {
			t.Errorf("%s: served", name)
		}
	}
	if _, ok := ServableEntry(good, "m", 0); ok {
		t.Error("dim 0 served")
	}
}

// TestCacheEntriesInRedis writes every case to a real Redis (EMBEDFLEET_TEST_REDIS_URL, a
// redis+cluster:// URL too; the Python suite runs it: tests/worker/test_cache_redis.py) and reads
// them with the client's lookup, one pipeline per model and width, wrong-typed keys among the
// good ones.
func TestCacheEntriesInRedis(t *testing.T) {
	url := os.Getenv("EMBEDFLEET_TEST_REDIS_URL")
	if url == "" {
		t.Skip("EMBEDFLEET_TEST_REDIS_URL is not set: no Redis to test against")
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	suffix := make([]byte, 4)
	_, _ = rand.Read(suffix)
	prefix := "test-go-cache-" + hex.EncodeToString(suffix)

	groups := map[string][]cacheEntryCase{}
	var order []string
	for _, c := range cacheEntryCases(t) {
		group := fmt.Sprintf("%s\x00%d", c.Model, c.Dim)
		if groups[group] == nil {
			order = append(order, group)
		}
		groups[group] = append(groups[group], c)
	}
	for _, group := range order {
		cases := groups[group]
		reader, err := newCacheReader(Config{
			RedisURL: url, RedisTimeout: 5 * time.Second, CacheKeyPrefix: prefix, ModelName: cases[0].Model,
		})
		if err != nil {
			t.Fatal(err)
		}
		defer reader.close()
		keys := make([]string, len(cases))
		for i, c := range cases {
			keys[i] = c.Name
			writeCase(ctx, t, reader.rdb, VectorKey(prefix, c.Model, c.Dim, c.Name), c)
		}
		found := reader.lookup(ctx, keys, cases[0].Dim)
		served := 0
		for i, c := range cases {
			if (found[i] != nil) != c.Servable {
				t.Errorf("%s: served %v, want %v", c.Name, found[i] != nil, c.Servable)
				continue
			}
			if found[i] != nil {
				served++
				checkServed(t, c, found[i])
			}
		}
		t.Logf("%s/%d: %d of %d entries served", cases[0].Model, cases[0].Dim, served, len(cases))
	}
}

// writeCase puts a case at key (its hash fields, a key of another type, or nothing), and removes
// it when the test ends.
func writeCase(ctx context.Context, t *testing.T, rdb redis.UniversalClient, key string, c cacheEntryCase) {
	t.Helper()
	t.Cleanup(func() { rdb.Del(context.Background(), key) })
	err := rdb.Del(ctx, key).Err()
	switch c.RedisType {
	case "hash":
		values := []any{}
		for name, raw := range c.fields(t) {
			values = append(values, name, raw)
		}
		err = errors.Join(err, rdb.HSet(ctx, key, values...).Err())
	case "string":
		err = errors.Join(err, rdb.Set(ctx, key, "not a hash", 0).Err())
	case "list":
		err = errors.Join(err, rdb.RPush(ctx, key, "not", "a", "hash").Err())
	case "set":
		err = errors.Join(err, rdb.SAdd(ctx, key, "not a hash").Err())
	case "none":
	default:
		t.Fatalf("%s: redis type %q", c.Name, c.RedisType)
	}
	if err != nil {
		t.Fatalf("%s: %v", c.Name, err)
	}
}
