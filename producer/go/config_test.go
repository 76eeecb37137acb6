package embedfleet

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"github.com/redis/go-redis/v9"
	"math/big"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

// The Python client's variables (schemas/testdata/client_environment.json): the Go client reads
// every one of them into its Config.
func TestConfigReadsEveryVariableOfThePythonClient(t *testing.T) {
	var file struct {
		Variables []string `json:"variables"`
	}
	readJSON(t, "client_environment.json", &file)
	if len(file.Variables) < 15 {
		t.Fatalf("only %d variables", len(file.Variables))
	}
	for i, name := range file.Variables {
		value := fmt.Sprintf("%d", 7001+i)
		t.Setenv(name, value)
		if !configHolds(ConfigFromEnv(), value) {
			t.Errorf("%s=%s is not read into Config", name, value)
		}
	}
}

// configHolds says whether any field of c holds value (strings, string lists, ints).
func configHolds(c Config, value string) bool {
	v := reflect.ValueOf(c)
	for i := 0; i < v.NumField(); i++ {
		f := v.Field(i)
		switch f.Kind() {
		case reflect.String:
			if f.String() == value {
				return true
			}
		case reflect.Int:
			if fmt.Sprint(f.Int()) == value {
				return true
			}
		case reflect.Slice:
			for j := 0; j < f.Len(); j++ {
				if f.Index(j).Kind() == reflect.String && f.Index(j).String() == value {
					return true
				}
			}
		}
	}
	return false
}

// writeCertificate writes a self-signed certificate and its key as PEM files.
func writeCertificate(t *testing.T, dir string) (certFile, keyFile string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	template := x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "embedfleet-test"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		IsCA:         true,
		KeyUsage:     x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, &template, &template, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile = filepath.Join(dir, "client.pem"), filepath.Join(dir, "client.key")
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		t.Fatal(err)
	}
	return certFile, keyFile
}

func TestKafkaMutualTLSLoadsTheClientCertificate(t *testing.T) {
	certFile, keyFile := writeCertificate(t, t.TempDir())
	cfg := ConfigFromEnv()
	cfg.KafkaSecurityProtocol = "SSL"
	cfg.KafkaSSLCAFile, cfg.KafkaSSLCertFile, cfg.KafkaSSLKeyFile = certFile, certFile, keyFile
	tlsConfig, err := kafkaTLS(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if len(tlsConfig.Certificates) != 1 || tlsConfig.RootCAs == nil {
		t.Fatalf("client certificate or CA not loaded: %+v", tlsConfig)
	}
	cfg.KafkaSSLKeyFile = ""
	if _, err := kafkaTLS(cfg); err == nil || !strings.Contains(err.Error(), "EMBEDFLEET_KAFKA_SSL_KEYFILE") {
		t.Fatalf("a certificate without its key must be refused, got %v", err)
	}
}

func TestRedisCABundleAppliesToRedissOnly(t *testing.T) {
	certFile, _ := writeCertificate(t, t.TempDir())
	cfg := ConfigFromEnv()
	cfg.RedisURL, cfg.RedisSSLCAFile = "rediss://127.0.0.1:6380/0", certFile
	reader, err := newCacheReader(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if reader.rdb.(*redis.Client).Options().TLSConfig.RootCAs == nil {
		t.Fatal("the CA bundle is not used for rediss://")
	}
	cfg.RedisURL = "redis://127.0.0.1:6379/0"
	if _, err := newCacheReader(cfg); err == nil {
		t.Fatal("a CA bundle with a plain redis:// URL must be refused (it would silently not be used)")
	}
}

func TestRedisClusterURLsGetTheClusterClient(t *testing.T) {
	cfg := ConfigFromEnv()
	cfg.RedisURL, cfg.RedisSSLCAFile = "redis+cluster://127.0.0.1:7000/0", ""
	reader, err := newCacheReader(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer reader.close()
	cluster, ok := reader.rdb.(*redis.ClusterClient)
	if !ok || cluster.Options().Addrs[0] != "127.0.0.1:7000" {
		t.Fatalf("redis+cluster:// must give a cluster client starting from its node, got %T", reader.rdb)
	}
	if url, _, clustered := clusterNodeURL("redis://h:1/0"); clustered || url != "redis://h:1/0" {
		t.Fatal("a plain URL is not a cluster URL")
	}
	url, addrs, clustered := clusterNodeURL("rediss+cluster://u:p@a:1,b:2/0")
	if !clustered || url != "rediss://u:p@a:1/0" || len(addrs) != 2 || addrs[1] != "b:2" {
		t.Fatalf("several nodes: got %q %v", url, addrs)
	}
}

// Printing a Config never shows its passwords, with any verb.
func TestConfigPrintsNoSecrets(t *testing.T) {
	c := Config{
		KafkaSASLUsername: "worker",
		KafkaSASLPassword: "sasl-secret",
		RedisURL:          "redis://reader:url-secret@redis:6379/0",
		RedisPassword:     "redis-secret",
	}
	for _, verb := range []string{"%v", "%+v", "%#v", "%s"} {
		printed := fmt.Sprintf(verb, c)
		for _, secret := range []string{"sasl-secret", "url-secret", "redis-secret"} {
			if strings.Contains(printed, secret) {
				t.Errorf("%s shows %q: %s", verb, secret, printed)
			}
		}
		if !strings.Contains(printed, "worker") || !strings.Contains(printed, "redis://reader:***@redis:6379/0") {
			t.Errorf("%s hides more than the secrets: %s", verb, printed)
		}
	}
	if got := fmt.Sprintf("%v", &c); strings.Contains(got, "sasl-secret") {
		t.Errorf("a pointer shows the password: %s", got)
	}
}
